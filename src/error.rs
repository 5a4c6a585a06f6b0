//! The one error type of the crate. Every misuse of the API is one of these, never a panic.

use std::fmt;

/// Everything that can go wrong when calling this crate.
///
/// Each variant carries the numbers involved so that its message says what was expected and what was
/// given.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A matrix view's row stride is smaller than its number of columns.
    StrideTooSmall {
        /// Which matrix.
        what: &'static str,
        /// Number of columns.
        cols: usize,
        /// The row stride given.
        row_stride: usize,
    },
    /// A matrix view's buffer is shorter than its shape and stride need.
    BufferTooSmall {
        /// Which matrix.
        what: &'static str,
        /// Rows of the view.
        rows: usize,
        /// Columns of the view.
        cols: usize,
        /// Row stride of the view.
        row_stride: usize,
        /// Elements the view needs: `(rows - 1) * row_stride + cols`.
        needed: usize,
        /// Elements the buffer has.
        len: usize,
    },
    /// A size computation (`rows * stride`, ...) overflows the integer it is computed in: `usize`
    /// on the CPU, the CUDA kernels' 32-bit indices on the GPU.
    SizeOverflow {
        /// Which computation.
        what: &'static str,
    },
    /// A buffer whose size the caller chose (projections of `n_max` columns, a benchmark shape, …)
    /// could not be allocated: the size fits the integer types but not this machine's memory.
    OutOfMemory {
        /// Which buffer.
        what: &'static str,
        /// The bytes asked for.
        bytes: usize,
    },
    /// A vector's length is not what the shapes around it require.
    LengthMismatch {
        /// Which vector.
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// A matrix's shape is not what the operation requires.
    ShapeMismatch {
        /// Which matrix.
        what: &'static str,
        /// The shape required, `[rows, cols]`.
        expected: [usize; 2],
        /// The shape given, `[rows, cols]`.
        actual: [usize; 2],
    },
    /// The VeRA rank `r` of two operands disagrees (e.g. `lambda_d` vs the projections).
    RankMismatch {
        /// Which operand.
        what: &'static str,
        /// The rank of the shared projections.
        expected: usize,
        /// The rank of the operand.
        actual: usize,
    },
    /// A rank of zero was given: VeRA needs `r >= 1`.
    ZeroRank,
    /// A layer is larger than the shared projections it is sliced from.
    LayerExceedsProjections {
        /// `"in_features"` (sliced from A's columns) or `"out_features"` (from B's rows).
        what: &'static str,
        /// The layer's size.
        layer: usize,
        /// The largest size the projections cover (`n_max` or `m_max`).
        max: usize,
    },
    /// An ISA tier name is not one of `avx512bf16`, `avx512`, `avx2`, `portable`.
    UnknownIsa {
        /// The name given.
        name: String,
    },
    /// A dtype name is not one of `f32`, `f16`, `bf16`.
    UnknownDType {
        /// The name given.
        name: String,
    },
    /// A file or directory could not be read or written.
    Io {
        /// The file or directory.
        path: String,
        /// What the operating system said.
        message: String,
    },
    /// A PEFT `adapter_config.json` is not valid JSON, or one of its fields has the wrong type or
    /// an impossible value.
    InvalidConfig {
        /// The config file (empty for a config built in memory).
        path: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A PEFT adapter is not a VeRA adapter (its `peft_type` is not `"VERA"`).
    NotVera {
        /// The config file.
        path: String,
        /// The `peft_type` found.
        peft_type: String,
    },
    /// A safetensors file is truncated or corrupt, or could not be encoded.
    Safetensors {
        /// The file.
        path: String,
        /// What the safetensors parser said.
        message: String,
    },
    /// A tensor that is needed is not in a safetensors file.
    MissingTensor {
        /// The file (empty for tensors held in memory).
        path: String,
        /// The tensor's key.
        key: String,
    },
    /// A safetensors file holds a tensor that does not belong there (e.g. a key that is not part
    /// of a VeRA adapter).
    UnexpectedTensor {
        /// The file (empty for tensors held in memory).
        path: String,
        /// The tensor's key.
        key: String,
        /// Why it does not belong.
        reason: String,
    },
    /// A tensor's dtype is not one of `f32`, `f16`, `bf16`.
    UnsupportedDType {
        /// The file (empty for tensors held in memory).
        path: String,
        /// The tensor's key.
        key: String,
        /// The dtype found, as safetensors names it (`F64`, `I32`, ...).
        dtype: String,
    },
    /// A tensor's shape disagrees with the rest of the adapter: its rank, its projections or the
    /// layer it is applied to.
    TensorShape {
        /// The file (empty for tensors held in memory).
        path: String,
        /// The tensor's key.
        key: String,
        /// The shape required, with where the requirement comes from.
        expected: String,
        /// The shape found.
        actual: Vec<usize>,
    },
    /// The adapter does not save its projections, and the sizes needed to regenerate them from the
    /// seed (`n_max`, `m_max`: the base model's largest adapted in/out features) were not given.
    MissingProjectionSizes {
        /// The adapter's `projection_prng_key`.
        seed: u64,
    },
    /// A module's layer is larger than the shared projections of its adapter.
    ProjectionsTooSmall {
        /// The module's name.
        module: String,
        /// `"in_features"` (against `n_max`) or `"out_features"` (against `m_max`).
        what: &'static str,
        /// The layer's size.
        needed: usize,
        /// The size the projections cover.
        given: usize,
    },
    /// A module's in_features is needed (e.g. to export the adapter as LoRA, whose `lora_A` is
    /// `[r, in_features]`) and was not given: a VeRA adapter does not store it.
    MissingInFeatures {
        /// The module's name.
        module: String,
    },
    /// An adapter has no module of this name.
    UnknownModule {
        /// The name asked for.
        module: String,
        /// The adapter's modules.
        available: Vec<String>,
    },
    /// No CUDA device can be used: the driver library is not installed, it reports no device, or
    /// the device asked for does not exist. The CPU path works without one.
    NoCudaDevice {
        /// Why, in the driver's words where it gave any.
        reason: String,
    },
    /// A CUDA driver call (or the CPU emulation of a kernel) failed.
    Cuda {
        /// The operation that failed (e.g. `"launch vera_up_tile_bf16"`).
        operation: String,
        /// The driver's (or the emulator's) message.
        message: String,
    },
    /// Device buffers passed to one call live on different CUDA devices (or contexts).
    DeviceMismatch {
        /// Which buffer is on another device than the stream.
        what: &'static str,
    },
    /// A row of a mixed-adapter call names an adapter the bank does not hold (valid: `0..adapters`,
    /// or [`NO_ADAPTER`](crate::NO_ADAPTER)).
    AdapterIndex {
        /// The row.
        row: usize,
        /// The index given for it.
        index: i64,
        /// The number of adapters in the bank.
        adapters: usize,
    },
    /// An adapter bank needs at least one adapter.
    EmptyBank,
    /// Adapters loaded together for one bank were not made for the same shared projections.
    ProjectionsDiffer {
        /// The adapter that differs.
        adapter: String,
        /// The first adapter, which the others are compared with.
        first: String,
        /// How they differ.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::StrideTooSmall { what, cols, row_stride } => {
                write!(f, "{what}: row stride {row_stride} is smaller than the number of columns {cols}")
            }
            Error::BufferTooSmall { what, rows, cols, row_stride, needed, len } => write!(
                f,
                "{what}: a {rows}x{cols} view with row stride {row_stride} needs {needed} elements, \
                 the buffer has {len}"
            ),
            Error::SizeOverflow { what } => {
                write!(f, "{what}: too large (the size overflows the integer type that indexes it)")
            }
            Error::OutOfMemory { what, bytes } => {
                write!(f, "{what}: cannot allocate {bytes} bytes ({:.1} GiB)", *bytes as f64 / (1u64 << 30) as f64)
            }
            Error::LengthMismatch { what, expected, actual } => {
                write!(f, "{what}: expected length {expected}, got {actual}")
            }
            Error::ShapeMismatch { what, expected, actual } => write!(
                f,
                "{what}: expected shape [{}, {}], got [{}, {}]",
                expected[0], expected[1], actual[0], actual[1]
            ),
            Error::RankMismatch { what, expected, actual } => {
                write!(f, "{what}: has rank {actual} but the shared projections have rank r = {expected}")
            }
            Error::ZeroRank => write!(f, "the VeRA rank r must be at least 1, got 0"),
            Error::LayerExceedsProjections { what, layer, max } => {
                write!(f, "layer {what} = {layer} exceeds the {max} covered by the shared projections")
            }
            Error::UnknownIsa { name } => {
                write!(f, "unknown ISA tier {name:?}: expected one of avx512bf16, avx512, avx2, portable")
            }
            Error::UnknownDType { name } => {
                write!(f, "unknown dtype {name:?}: expected one of f32, f16, bf16")
            }
            Error::Io { path, message } => write!(f, "{path}: {message}"),
            Error::InvalidConfig { path, message } => {
                write!(f, "{}invalid adapter config: {message}", at(path))
            }
            Error::NotVera { path, peft_type } => {
                write!(f, "{}peft_type is {peft_type:?}, not \"VERA\": this is not a VeRA adapter", at(path))
            }
            Error::Safetensors { path, message } => {
                write!(f, "{}not a valid safetensors file: {message}", at(path))
            }
            Error::MissingTensor { path, key } => write!(f, "{}no tensor {key:?}", at(path)),
            Error::UnexpectedTensor { path, key, reason } => {
                write!(f, "{}unexpected tensor {key:?}: {reason}", at(path))
            }
            Error::UnsupportedDType { path, key, dtype } => {
                write!(f, "{}tensor {key:?} has dtype {dtype}: expected F32, F16 or BF16", at(path))
            }
            Error::TensorShape { path, key, expected, actual } => {
                write!(f, "{}tensor {key:?} has shape {actual:?}, expected {expected}", at(path))
            }
            Error::MissingProjectionSizes { seed } => write!(
                f,
                "the adapter does not save its projections (save_projection = false): give n_max and \
                 m_max, the largest in_features and out_features of the adapted layers, to regenerate \
                 them from projection_prng_key = {seed}"
            ),
            Error::ProjectionsTooSmall { module, what, needed, given } => {
                let max = if *what == "in_features" { "n_max" } else { "m_max" };
                write!(
                    f,
                    "module {module:?} has {what} = {needed} but the projections cover only \
                     {max} = {given}"
                )
            }
            Error::MissingInFeatures { module } => write!(
                f,
                "module {module:?}: its in_features is not known (a VeRA adapter does not store it): \
                 give it for this module or for every module"
            ),
            Error::UnknownModule { module, available } => {
                write!(f, "the adapter has no module {module:?} (it has: {})", available.join(", "))
            }
            Error::NoCudaDevice { reason } => write!(f, "no CUDA device: {reason}"),
            Error::Cuda { operation, message } => write!(f, "CUDA: {operation} failed: {message}"),
            Error::DeviceMismatch { what } => {
                write!(f, "{what} is on another CUDA device (or context) than the stream it was given to")
            }
            Error::AdapterIndex { row, index, adapters } => write!(
                f,
                "row {row} names adapter {index}, but the bank holds {adapters} (valid: 0..{adapters}, \
                 or -1 for no adapter)"
            ),
            Error::EmptyBank => write!(f, "an adapter bank needs at least one adapter, got none"),
            Error::ProjectionsDiffer { adapter, first, reason } => write!(
                f,
                "adapter {adapter:?} was not made for the projections of adapter {first:?}: {reason}; \
                 a bank needs adapters that share them"
            ),
        }
    }
}

/// `"path: "`, or nothing for an empty path (data held in memory).
fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

impl std::error::Error for Error {}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
