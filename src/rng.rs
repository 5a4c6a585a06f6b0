//! PyTorch's CPU random generator, reproduced bit for bit for what PEFT's VeRA initialisation uses.
//!
//! `torch.Generator("cpu").manual_seed(seed)` is a standard MT19937 seeded with the low 32 bits of
//! the seed. `Tensor.uniform_(from, to)` on a float32 tensor, element by element in row-major order:
//! rounds `from` and `to` to f32, takes one 32-bit draw, keeps its low 24 bits as
//! `x = bits * 2^-24` (in f64), and returns `f32(x * f64(f32(to - from)) + f64(from))`.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// `torch.Generator("cpu")`: MT19937 with torch's seeding.
#[derive(Clone)]
pub struct TorchCpuGenerator {
    state: [u32; N],
    next: usize,
}

impl std::fmt::Debug for TorchCpuGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchCpuGenerator").field("next", &self.next).finish_non_exhaustive()
    }
}

impl TorchCpuGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`. torch keeps only the low 32 bits for MT19937
    /// (a negative Python seed arrives as its two's-complement `u64`).
    pub fn manual_seed(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Self { state, next: N }
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & UPPER_MASK) | (self.state[(i + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    /// The next 32-bit draw (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `tensor.uniform_(from, to, generator=self)` for a contiguous float32 tensor, in order.
    pub fn fill_uniform_f32(&mut self, out: &mut [f32], from: f64, to: f64) {
        let from = from as f32;
        let to = to as f32;
        let range = f64::from(to - from);
        let from = f64::from(from);
        for v in out {
            let x = f64::from(self.next_u32() & ((1 << 24) - 1)) * (1.0 / (1u64 << 24) as f64);
            *v = (x * range + from) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_mt19937_sequence() {
        // The C++ standard fixes std::mt19937's 10000th output for the default seed 5489.
        let mut g = TorchCpuGenerator::manual_seed(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_uses_the_low_32_bits() {
        let mut a = TorchCpuGenerator::manual_seed(7);
        let mut b = TorchCpuGenerator::manual_seed((1u64 << 32) + 7);
        assert_eq!(a.next_u32(), b.next_u32());
    }

    #[test]
    fn uniform_stays_in_range() {
        let mut g = TorchCpuGenerator::manual_seed(1);
        let mut v = vec![0.0f32; 1000];
        g.fill_uniform_f32(&mut v, -0.25, 0.25);
        assert!(v.iter().all(|&x| (-0.25..0.25).contains(&x)));
        assert!(v.iter().any(|&x| x > 0.2) && v.iter().any(|&x| x < -0.2));
    }
}
