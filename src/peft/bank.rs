//! Several PEFT VeRA adapters made for the same shared projections, loaded together so that one
//! batch can mix them ([`crate::forward_mixed`]): from several adapter directories, or from the
//! layout `save_pretrained` writes for a model holding several adapters.

use std::fs;
use std::path::Path;

use super::{PeftAdapter, ProjectionSizes, CONFIG_FILE};
use crate::bank::AdapterBank;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::projections::Projections;

/// The name `save_pretrained` gives the adapter it writes at the top of the directory.
pub const DEFAULT_ADAPTER: &str = "default";

/// Named PEFT VeRA adapters that share their projections (the same rank, and the same
/// `projection_prng_key` or the same saved A and B), in bank order: adapter `k` of every
/// [`AdapterBank`] made from them is `adapters()[k]`.
///
/// ```
/// use vera_kernels::peft::PeftAdapters;
/// use vera_kernels::{forward_mixed, MatMut, MatRef, Mode, NO_ADAPTER};
///
/// // A model saved with three adapters, a0..a2, one sub-folder each.
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft-vera-train/multi");
/// let set = PeftAdapters::load_saved(dir)?;
/// assert_eq!(set.names(), ["a0", "a1", "a2"]);
/// let projections = set.projections::<f32>(None)?;
/// let bank = set.bank("layers.0")?; // 48 -> 40
/// let x = vec![1.0f32; 4 * 48];
/// let mut y = vec![0.0f32; 4 * 40];
/// let rows = [2, 0, NO_ADAPTER, 1];
/// forward_mixed(
///     &projections,
///     &bank,
///     &rows,
///     MatRef::from_slice(&x, 4, 48)?,
///     MatMut::from_slice(&mut y, 4, 40)?,
///     Mode::Overwrite,
/// )?;
/// # Ok::<(), vera_kernels::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapters {
    names: Vec<String>,
    adapters: Vec<PeftAdapter>,
}

impl PeftAdapters {
    /// Named adapters, in bank order.
    ///
    /// Errors: [`Error::EmptyBank`] for none; [`Error::ProjectionsDiffer`] when an adapter's rank
    /// or projections differ from the first's (a different `projection_prng_key`, different saved
    /// A or B, or saved projections that are not the ones the other adapter's key draws).
    pub fn new(named: Vec<(String, PeftAdapter)>) -> Result<Self> {
        let (names, adapters): (Vec<_>, Vec<_>) = named.into_iter().unzip();
        let first = adapters.first().ok_or(Error::EmptyBank)?;
        for (name, adapter) in names.iter().zip(&adapters).skip(1) {
            same_projections(first, adapter).map_err(|reason| Error::ProjectionsDiffer {
                adapter: name.clone(),
                first: names[0].clone(),
                reason,
            })?;
        }
        Ok(Self { names, adapters })
    }

    /// Loads adapter directories (each as [`PeftAdapter::load`]), adapter `k` from `dirs[k]`,
    /// named after its directory.
    ///
    /// Errors: those of [`PeftAdapter::load`] and [`PeftAdapters::new`].
    pub fn load<P: AsRef<Path>>(dirs: &[P]) -> Result<Self> {
        let named = dirs
            .iter()
            .map(|dir| {
                let dir = dir.as_ref();
                let name =
                    dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
                Ok((name, PeftAdapter::load(dir)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(named)
    }

    /// Loads what PEFT's `save_pretrained` writes for a model holding several adapters: the
    /// adapter named `"default"` at the top of `dir` (when there is an `adapter_config.json`
    /// there), then every sub-folder holding an `adapter_config.json`, named after it, in the
    /// order of their names.
    ///
    /// Errors: [`Error::Io`] when `dir` cannot be read or holds no adapter; those of
    /// [`PeftAdapter::load`] and [`PeftAdapters::new`].
    pub fn load_saved(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let io = |e: std::io::Error| Error::Io { path: dir.display().to_string(), message: e.to_string() };
        let mut named = Vec::new();
        if dir.join(CONFIG_FILE).is_file() {
            named.push((DEFAULT_ADAPTER.to_string(), PeftAdapter::load(dir)?));
        }
        let mut subs = Vec::new();
        for entry in fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.join(CONFIG_FILE).is_file() {
                subs.push(path);
            }
        }
        subs.sort();
        for sub in subs {
            let name = sub.file_name().expect("a directory entry has a name").to_string_lossy().into_owned();
            named.push((name, PeftAdapter::load(&sub)?));
        }
        if named.is_empty() {
            return Err(Error::Io {
                path: dir.display().to_string(),
                message: format!("no adapter here: neither {CONFIG_FILE} nor a sub-folder holding one"),
            });
        }
        Self::new(named)
    }

    /// The adapters' names, in bank order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The adapters, in bank order.
    pub fn adapters(&self) -> &[PeftAdapter] {
        &self.adapters
    }

    /// The bank index of the adapter called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The bank of one module: every adapter's vectors for it, in bank order.
    ///
    /// Errors: [`Error::UnknownModule`] when an adapter lacks the module (naming the adapter);
    /// those of [`AdapterBank::new`] when the modules' `out_features` differ.
    pub fn bank(&self, module: &str) -> Result<AdapterBank> {
        let adapters = self
            .names
            .iter()
            .zip(&self.adapters)
            .map(|(name, a)| match a.module(module) {
                Ok(m) => Ok(m.adapter().clone()),
                Err(Error::UnknownModule { module, available }) => {
                    Err(Error::UnknownModule { module: format!("{module} (in adapter {name})"), available })
                }
                Err(e) => Err(e),
            })
            .collect::<Result<Vec<_>>>()?;
        AdapterBank::new(&adapters)
    }

    /// The shared projections (as [`PeftAdapter::projections`]), from the first adapter that saves
    /// them, else regenerated from the common key with `sizes`.
    ///
    /// Errors: as [`PeftAdapter::projections`].
    pub fn projections<T: Element>(&self, sizes: Option<ProjectionSizes>) -> Result<Projections<T>> {
        let source = self.adapters.iter().find(|a| a.saved_projections().is_some()).unwrap_or(&self.adapters[0]);
        let projections = source.projections::<T>(sizes)?;
        // Every adapter's modules must fit them (the first one's check covers only its own).
        for a in &self.adapters {
            a.check_m_max(projections.m_max())?;
        }
        Ok(projections)
    }
}

/// `Ok` when `b` was made for the same projections as `a`, else why not.
fn same_projections(a: &PeftAdapter, b: &PeftAdapter) -> std::result::Result<(), String> {
    let (ca, cb) = (a.config(), b.config());
    if ca.r != cb.r {
        return Err(format!("rank r = {}, the first adapter's is {}", cb.r, ca.r));
    }
    match (a.saved_projections(), b.saved_projections()) {
        (Some((a1, b1)), Some((a2, b2))) => {
            let same = |x: &super::Tensor, y: &super::Tensor| {
                x.shape() == y.shape() && x.data().iter().zip(y.data()).all(|(p, q)| p.to_bits() == q.to_bits())
            };
            if !same(a1, a2) || !same(b1, b2) {
                return Err("its saved projections (vera_A, vera_B) differ from the first adapter's".to_string());
            }
        }
        (None, None) => {
            if ca.projection_prng_key != cb.projection_prng_key {
                return Err(format!(
                    "projection_prng_key = {}, the first adapter's is {}",
                    cb.projection_prng_key, ca.projection_prng_key
                ));
            }
        }
        // One saves its projections, the other draws them from its key: the saved ones must be
        // the ones that key draws (in f32, as saved).
        (Some(_), None) | (None, Some(_)) => {
            let (saved, seeded) = if a.saved_projections().is_some() { (a, b) } else { (b, a) };
            let sizes = saved.projection_sizes().expect("saved projections have sizes");
            let drawn =
                Projections::<f32>::from_seed(seeded.config().projection_prng_key, ca.r, sizes.n_max, sizes.m_max)
                    .map_err(|e| e.to_string())?;
            let kept = saved.projections::<f32>(None).map_err(|e| e.to_string())?;
            if drawn.as_slices() != kept.as_slices() {
                return Err(format!(
                    "one adapter saves its projections and the other draws them from projection_prng_key = {}, \
                     and they differ",
                    seeded.config().projection_prng_key
                ));
            }
        }
    }
    Ok(())
}
