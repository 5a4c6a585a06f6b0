//! Allocations whose size the caller chose. `vec![v; len]` aborts the process when the memory is
//! not there (a typo such as `n_max = 99999999999` asks for terabytes); these return
//! [`Error::SizeOverflow`] or [`Error::OutOfMemory`] instead.

use crate::error::{Error, Result};

/// `rows · cols`, or [`Error::SizeOverflow`] naming `what`.
pub(crate) fn product(what: &'static str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or(Error::SizeOverflow { what })
}

/// An empty vector with room for `len` elements, or an `Err` naming `what`.
pub(crate) fn with_capacity<T>(what: &'static str, len: usize) -> Result<Vec<T>> {
    let bytes = len.checked_mul(size_of::<T>()).ok_or(Error::SizeOverflow { what })?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory { what, bytes })?;
    Ok(v)
}

/// `len` copies of `value`, or an `Err` naming `what`.
pub(crate) fn filled<T: Clone>(what: &'static str, len: usize, value: T) -> Result<Vec<T>> {
    let mut v = with_capacity(what, len)?;
    v.resize(len, value);
    Ok(v)
}

/// `f` applied to every element of `src`, collected into a vector allocated as [`with_capacity`].
pub(crate) fn map<S: Copy, T>(what: &'static str, src: &[S], f: impl Fn(S) -> T) -> Result<Vec<T>> {
    let mut v = with_capacity(what, src.len())?;
    v.extend(src.iter().map(|&s| f(s)));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_sizes_are_errors_not_aborts() {
        assert_eq!(filled("huge", usize::MAX / 2, 0u32), Err(Error::SizeOverflow { what: "huge" }));
        // Fits usize, but no machine has 2^60 bytes (the reservation fails before touching memory).
        // Miri reports such a request as resource exhaustion and stops, instead of failing it.
        if !cfg!(miri) {
            let len = 1usize << 58;
            assert_eq!(filled("huge", len, 0.0f32), Err(Error::OutOfMemory { what: "huge", bytes: len * 4 }));
        }
        assert_eq!(product("rows x cols", usize::MAX, 2), Err(Error::SizeOverflow { what: "rows x cols" }));
    }

    #[test]
    fn small_sizes_are_filled() {
        assert_eq!(filled("v", 3, 7u8).unwrap(), vec![7, 7, 7]);
        assert_eq!(map("v", &[1.0f32, 2.0], |x| x * 2.0).unwrap(), vec![2.0, 4.0]);
        assert_eq!(product("p", 3, 5), Ok(15));
    }
}
