//! Operand layouts and packing, shared by every ISA tier.
//!
//! All products here are `out[row, col] = Σ_k left[row, k] · right[col, k]`, computed by micro-kernels
//! that broadcast one `left` element per row and multiply it with `NR` consecutive columns of
//! `right`. So `right` (the weights) is packed once into column panels: panel `p` holds columns
//! `p·NR .. p·NR + NR` as `[k][NR]`, zero-padded past the last column. `left` (activations, `u`,
//! ...) is packed per call into [`Left`] tiles of `MR` rows, `[k][MR]` each; for AMX tiles (which
//! multiply a whole 16 x 32 block of `left` at once), into [`RowPairs`] instead.

//!
//! One file per job: [`panels`] (the weights' column panels), [`left`] (`Left` tiles and their
//! packers), [`source`] (the rows a left operand is packed from), [`row_pairs`] (AMX tile operands,
//! plain and split), [`bf16`] (a value's bf16 bits and split parts, the split layouts' geometry),
//! [`projections`] (the shared projections packed once per layout, and their transposes).

mod bf16;
mod left;
mod panels;
mod projections;
mod row_pairs;
mod source;

pub(crate) use bf16::split_pairs;
#[cfg(test)]
pub(crate) use bf16::{split3_bits, split_bits, split_panels, tripled_bits};
pub(crate) use left::{
    pack_cols, pack_pairs, pack_pairs_rounded, pack_pairs_scaled, pack_rows, pack_rows_scaled, Left,
};
pub use panels::Panels;
pub(crate) use panels::PanelsPtr;
pub(crate) use projections::{pack_projections, WeightPanels};
pub use projections::{PackCache, PackedProjections, TransposedProjections};
pub(crate) use row_pairs::{
    pack_row_pairs, pack_row_pairs_rounded, pack_row_pairs_scaled, pack_row_split, pack_row_split3,
    pack_row_split_scaled, RowPairs, TILE_ROWS,
};
pub(crate) use source::{Bits, Gathered, RowSource};

/// Columns per weight panel (two 512-bit vectors of f32).
pub(crate) const NR: usize = 32;
/// Rows per micro-kernel tile.
pub(crate) const MR: usize = 8;

/// Bytes of alignment of packed operands (one cache line, one AMX tile row).
pub(crate) const ALIGN: usize = 64;

/// The offset of the first `ALIGN`-aligned element of `v` (0 for zero-sized or empty).
pub(super) fn aligned_offset<W>(v: &[W]) -> usize {
    let off = v.as_ptr().align_offset(ALIGN);
    if off == usize::MAX {
        0
    } else {
        off.min(v.len())
    }
}

/// Elements of slack an aligned buffer of `W` needs.
pub(super) const fn align_slack<W>() -> usize {
    ALIGN / if size_of::<W>() == 0 { 1 } else { size_of::<W>() }
}
