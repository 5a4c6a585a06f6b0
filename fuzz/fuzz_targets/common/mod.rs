//! Helpers shared by the fuzz targets.
#![allow(dead_code)]

/// Splits `data` into `n` sections: each but the last is a little-endian `u32` length (clamped to
/// what is left) followed by that many bytes; the last is the rest. Missing sections are empty.
pub fn sections(mut data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    for _ in 1..n {
        let (len, rest) = match data {
            [a, b, c, d, rest @ ..] => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, rest),
            _ => (0, &[][..]),
        };
        let len = len.min(rest.len());
        out.push(&rest[..len]);
        data = &rest[len..];
    }
    out.push(data);
    out
}

/// Small values (multiples of 1/8 in [-1, 1]), deterministic.
pub fn pattern(len: usize, salt: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + salt * 3) % 17) as f32 / 8.0 - 1.0).collect()
}
