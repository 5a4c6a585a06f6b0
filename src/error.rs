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
    /// A size computation (`rows * stride`, ...) does not fit in `usize`.
    SizeOverflow {
        /// Which computation.
        what: &'static str,
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
    /// A dtype name is not one of `f32`, `f16`, `bf16`.
    UnknownDType {
        /// The name given.
        name: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::StrideTooSmall { what, cols, row_stride } => write!(
                f,
                "{what}: row stride {row_stride} is smaller than the number of columns {cols}"
            ),
            Error::BufferTooSmall { what, rows, cols, row_stride, needed, len } => write!(
                f,
                "{what}: a {rows}x{cols} view with row stride {row_stride} needs {needed} elements, \
                 the buffer has {len}"
            ),
            Error::SizeOverflow { what } => write!(f, "{what}: size does not fit in usize"),
            Error::LengthMismatch { what, expected, actual } => {
                write!(f, "{what}: expected length {expected}, got {actual}")
            }
            Error::ShapeMismatch { what, expected, actual } => write!(
                f,
                "{what}: expected shape [{}, {}], got [{}, {}]",
                expected[0], expected[1], actual[0], actual[1]
            ),
            Error::RankMismatch { what, expected, actual } => write!(
                f,
                "{what}: has rank {actual} but the shared projections have rank r = {expected}"
            ),
            Error::ZeroRank => write!(f, "the VeRA rank r must be at least 1, got 0"),
            Error::LayerExceedsProjections { what, layer, max } => write!(
                f,
                "layer {what} = {layer} exceeds the {max} covered by the shared projections"
            ),
            Error::UnknownDType { name } => {
                write!(f, "unknown dtype {name:?}: expected one of f32, f16, bf16")
            }
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
