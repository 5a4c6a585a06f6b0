//! Safetensors files of `f32` / `f16` / `bf16` tensors: reading with every failure an [`Error`],
//! and writing atomically (a temporary file in the same directory, then a rename).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// A floating-point tensor held as `f32` values (exact for `f16` and `bf16`), with the dtype it is
/// stored in.
///
/// The values are always representable in the dtype ([`Tensor::new`] rounds them), so writing a
/// tensor and reading it back gives the same tensor, bit for bit.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Number of elements of `shape`, or [`Error::SizeOverflow`].
fn element_count(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or(Error::SizeOverflow { what: "tensor shape" })
}

/// Rounds an f32 to `dtype` and widens it back.
fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => bf16::from_f32(v).to_f32(),
    }
}

impl Tensor {
    /// A tensor of `shape` stored as `dtype`, from row-major values that are rounded to `dtype`.
    ///
    /// Errors: [`Error::LengthMismatch`] when `data.len()` is not the product of `shape`,
    /// [`Error::SizeOverflow`] when that product does not fit in `usize`.
    pub fn new(dtype: DType, shape: Vec<usize>, mut data: Vec<f32>) -> Result<Self> {
        let len = element_count(&shape)?;
        if data.len() != len {
            return Err(Error::LengthMismatch {
                what: "tensor data (must have the product of the shape's elements)",
                expected: len,
                actual: data.len(),
            });
        }
        if dtype != DType::F32 {
            for v in &mut data {
                *v = round_to(dtype, *v);
            }
        }
        Ok(Self { dtype, shape, data })
    }

    /// A tensor of `shape` stored in `T`'s dtype, from its elements (exact).
    ///
    /// Errors: as [`Tensor::new`].
    pub fn from_elements<T: Element>(shape: Vec<usize>, data: &[T]) -> Result<Self> {
        Self::new(T::DTYPE, shape, data.iter().map(|v| v.to_f32()).collect())
    }

    /// The dtype the tensor is stored in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major, widened to `f32`.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, row-major, widened to `f32`.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The values rounded to `T` (exact when `T` is this tensor's dtype or wider).
    pub fn to_elements<T: Element>(&self) -> Vec<T> {
        self.data.iter().map(|&v| T::from_f32(v)).collect()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The same values stored as another dtype (rounded when it is narrower).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        let data = self.data.iter().map(|&v| round_to(dtype, v)).collect();
        Tensor { dtype, shape: self.shape.clone(), data }
    }

    /// Little-endian bytes in the stored dtype.
    fn to_le_bytes(&self) -> Vec<u8> {
        match self.dtype {
            DType::F32 => self.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => self.data.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            DType::BF16 => self.data.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        }
    }

    fn safetensors_dtype(&self) -> Dtype {
        match self.dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        }
    }
}

/// One tensor's place in a file.
#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the whole file.
    bytes: Range<usize>,
}

/// A safetensors file read into memory and validated: its tensors are decoded on demand.
///
/// Reading never panics, whatever the bytes: a file that is truncated, has a corrupt header or
/// inconsistent offsets is an [`Error::Safetensors`].
#[derive(Clone, Debug)]
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    entries: BTreeMap<String, Entry>,
    metadata: Option<HashMap<String, String>>,
}

impl TensorFile {
    /// Reads and validates a safetensors file.
    ///
    /// Errors: [`Error::Io`] when it cannot be read, [`Error::Safetensors`] when it is not a valid
    /// safetensors file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| io_error(path, &e))?;
        Self::from_bytes(path, bytes)
    }

    /// Validates the bytes of a safetensors file; `path` only names it in errors.
    ///
    /// Errors: [`Error::Safetensors`] when the bytes are not a valid safetensors file.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let invalid =
            |e: &dyn std::fmt::Display| Error::Safetensors { path: path.display().to_string(), message: e.to_string() };
        let (header_len, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(&e))?;
        // read_metadata checked that the offsets tile the data section exactly.
        let start = header_len.checked_add(8).ok_or_else(|| invalid(&"header length overflows"))?;
        let mut entries = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let (s, e) = info.data_offsets;
            let range = start
                .checked_add(s)
                .zip(start.checked_add(e))
                .map(|(s, e)| s..e)
                .filter(|r| r.start <= r.end && r.end <= bytes.len())
                .ok_or_else(|| invalid(&format!("tensor {name:?} lies outside the file")))?;
            entries.insert(name, Entry { dtype: info.dtype, shape: info.shape.clone(), bytes: range });
        }
        Ok(Self { metadata: metadata.metadata().clone(), path, bytes, entries })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn path_string(&self) -> String {
        self.path.display().to_string()
    }

    /// The tensors' keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Whether the file holds a tensor with this key.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The shape of a tensor, whatever its dtype.
    ///
    /// Errors: [`Error::MissingTensor`].
    pub fn shape(&self, key: &str) -> Result<&[usize]> {
        Ok(&self.entry(key)?.shape)
    }

    /// The dtype of a tensor as safetensors names it (`F32`, `BF16`, `I64`, ...).
    ///
    /// Errors: [`Error::MissingTensor`].
    pub fn dtype_name(&self, key: &str) -> Result<String> {
        Ok(format!("{:?}", self.entry(key)?.dtype))
    }

    /// The `__metadata__` map of the file's header, if any.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.entries.get(key).ok_or_else(|| Error::MissingTensor { path: self.path_string(), key: key.to_string() })
    }

    /// Decodes a tensor.
    ///
    /// Errors: [`Error::MissingTensor`], or [`Error::UnsupportedDType`] when it is not F32, F16 or
    /// BF16.
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        let entry = self.entry(key)?;
        let bytes = self.bytes.get(entry.bytes.clone()).ok_or_else(|| Error::Safetensors {
            path: self.path_string(),
            message: format!("tensor {key:?} lies outside the file"),
        })?;
        let (dtype, data): (DType, Vec<f32>) = match entry.dtype {
            Dtype::F32 => {
                (DType::F32, bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Dtype::F16 => {
                (DType::F16, bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            Dtype::BF16 => {
                (DType::BF16, bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            }
            other => {
                return Err(Error::UnsupportedDType {
                    path: self.path_string(),
                    key: key.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        // The validated header guarantees len == product(shape); Tensor::new re-checks it.
        Tensor::new(dtype, entry.shape.clone(), data)
            .map_err(|e| Error::Safetensors { path: self.path_string(), message: format!("tensor {key:?}: {e}") })
    }

    /// Decodes an integer tensor (I8, I16, I32, I64, U8, U16, U32) as i64 values: e.g. the row →
    /// adapter map of a mixed-adapter batch.
    ///
    /// Errors: [`Error::MissingTensor`], or [`Error::UnexpectedTensor`] for any other dtype (U64
    /// included: its values may not fit i64).
    pub fn integers(&self, key: &str) -> Result<Vec<i64>> {
        let entry = self.entry(key)?;
        let bytes = self.bytes.get(entry.bytes.clone()).ok_or_else(|| Error::Safetensors {
            path: self.path_string(),
            message: format!("tensor {key:?} lies outside the file"),
        })?;
        fn decode<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> i64) -> Vec<i64> {
            bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks of N bytes"))).collect()
        }
        Ok(match entry.dtype {
            Dtype::I8 => decode::<1>(bytes, |b| i64::from(i8::from_le_bytes(b))),
            Dtype::U8 => decode::<1>(bytes, |b| i64::from(b[0])),
            Dtype::I16 => decode::<2>(bytes, |b| i64::from(i16::from_le_bytes(b))),
            Dtype::U16 => decode::<2>(bytes, |b| i64::from(u16::from_le_bytes(b))),
            Dtype::I32 => decode::<4>(bytes, |b| i64::from(i32::from_le_bytes(b))),
            Dtype::U32 => decode::<4>(bytes, |b| i64::from(u32::from_le_bytes(b))),
            Dtype::I64 => decode::<8>(bytes, i64::from_le_bytes),
            other => {
                return Err(Error::UnexpectedTensor {
                    path: self.path_string(),
                    key: key.to_string(),
                    reason: format!(
                        "its dtype is {other:?}, expected an integer type (I8, I16, I32, I64, U8, U16, U32)"
                    ),
                })
            }
        })
    }

    /// Writes this file to `path` with some tensors replaced (or added): every other tensor is
    /// copied byte for byte, whatever its dtype, and the header's metadata is kept. Atomic as
    /// [`write_safetensors`].
    ///
    /// Errors: [`Error::Io`], [`Error::Safetensors`].
    pub fn write_replacing(&self, path: impl AsRef<Path>, replace: &[(&str, &Tensor)]) -> Result<()> {
        let path = path.as_ref();
        let encoded: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> =
            replace.iter().map(|(k, t)| (*k, t.safetensors_dtype(), t.shape.clone(), t.to_le_bytes())).collect();
        let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
        let st_error =
            |e: &dyn std::fmt::Display| Error::Safetensors { path: path.display().to_string(), message: e.to_string() };
        for (name, entry) in &self.entries {
            if replace.iter().any(|(k, _)| k == name) {
                continue;
            }
            let data = self
                .bytes
                .get(entry.bytes.clone())
                .ok_or_else(|| st_error(&format!("tensor {name:?} lies outside the file")))?;
            let view = TensorView::new(entry.dtype, entry.shape.clone(), data).map_err(|e| st_error(&e))?;
            views.push((name.clone(), view));
        }
        for (key, dtype, shape, data) in &encoded {
            let view = TensorView::new(*dtype, shape.clone(), data).map_err(|e| st_error(&e))?;
            views.push((key.to_string(), view));
        }
        let bytes = safetensors::serialize(views, self.metadata.clone()).map_err(|e| st_error(&e))?;
        write_atomically(path, &bytes)
    }
}

/// Writes tensors to a safetensors file with the given header metadata (PEFT writes
/// `{"format": "pt"}`).
///
/// The file is written to a temporary file next to `path`, then renamed over it: a failure leaves
/// no partial file behind, and readers never see half a file.
///
/// Errors: [`Error::Io`], or [`Error::Safetensors`] when the header cannot be encoded (e.g. the
/// same key twice).
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let st_error =
        |e: &dyn std::fmt::Display| Error::Safetensors { path: path.display().to_string(), message: e.to_string() };
    for (i, (key, _)) in tensors.iter().enumerate() {
        if tensors[..i].iter().any(|(k, _)| k == key) {
            return Err(st_error(&format!("tensor {key:?} is given twice")));
        }
    }
    let encoded: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(k, t)| (*k, t.safetensors_dtype(), t.shape.clone(), t.to_le_bytes())).collect();
    let mut views = Vec::with_capacity(encoded.len());
    for (key, dtype, shape, data) in &encoded {
        let view = TensorView::new(*dtype, shape.clone(), data).map_err(|e| st_error(&e))?;
        views.push((key.to_string(), view));
    }
    let bytes = safetensors::serialize(views, metadata).map_err(|e| st_error(&e))?;
    write_atomically(path, &bytes)
}

pub(crate) fn io_error(path: &Path, e: &std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), message: e.to_string() }
}

/// Writes `bytes` to a fresh temporary file in `path`'s directory, flushes it to disk and renames
/// it to `path`. On failure the temporary file is removed and `path` is untouched.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io { path: path.display().to_string(), message: "not a file name".to_string() })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> std::io::Result<()> {
        let mut file = fs::File::create_new(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(path, &e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(path, &e));
    }
    Ok(())
}
