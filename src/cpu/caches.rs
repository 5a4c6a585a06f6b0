//! The data caches one core sees, read at run time from CPUID (leaf 4 on Intel, 0x8000001D on
//! AMD: the same register layout), so that blocking that depends on a cache's size follows the CPU
//! it runs on rather than the one it was tuned on.
//!
//! Where CPUID cannot say (another architecture, Miri, a leaf the CPU lacks), the sizes are
//! [`CacheSizes::ASSUMED`] and [`CacheSizes::from_cpuid`] is false.

use std::sync::OnceLock;

/// Sizes in bytes of the data caches a core reads through, as CPUID describes them (a shared
/// cache's whole size: CPUID does not say how many cores share it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheSizes {
    /// The level-1 data cache.
    pub l1d: usize,
    /// The level-2 cache.
    pub l2: usize,
    /// The level-3 cache (0: none).
    pub l3: usize,
    /// Whether the sizes were read from CPUID (false: [`CacheSizes::ASSUMED`]).
    pub from_cpuid: bool,
}

impl CacheSizes {
    /// What blocking assumes when CPUID cannot say: AMD Zen 4's L1d and L2, a 32 MiB L3.
    pub const ASSUMED: CacheSizes = CacheSizes { l1d: 32 << 10, l2: 1 << 20, l3: 32 << 20, from_cpuid: false };

    /// The sizes described by a list of CPUID cache descriptors (`eax, ebx, ecx` of each subleaf
    /// of leaf 4 or 0x8000001D, in order, up to the first with type 0); a level not described keeps
    /// its [`CacheSizes::ASSUMED`] size, except L3, which is then 0.
    pub(crate) fn from_descriptors(descriptors: impl IntoIterator<Item = [u32; 3]>) -> CacheSizes {
        let mut sizes = CacheSizes { l3: 0, from_cpuid: true, ..CacheSizes::ASSUMED };
        let mut seen = false;
        for [eax, ebx, ecx] in descriptors {
            // EAX[4:0]: 0 no more caches, 1 data, 2 instruction, 3 unified; EAX[7:5]: level.
            let (kind, level) = (eax & 0x1f, (eax >> 5) & 0x7);
            if kind == 0 {
                break;
            }
            if kind == 2 {
                continue;
            }
            // EBX[31:22] ways - 1, EBX[21:12] partitions - 1, EBX[11:0] line size - 1; ECX sets - 1.
            let field = |v: u32, lo: u32, bits: u32| (((v >> lo) & ((1 << bits) - 1)) + 1) as usize;
            let size = field(ebx, 22, 10) * field(ebx, 12, 10) * field(ebx, 0, 12) * (ecx as usize + 1);
            match level {
                1 => sizes.l1d = size,
                2 => sizes.l2 = size,
                3 => sizes.l3 = size,
                _ => continue,
            }
            seen = true;
        }
        if seen {
            sizes
        } else {
            CacheSizes::ASSUMED
        }
    }
}

/// This CPU's data caches, read once.
pub fn cache_sizes() -> CacheSizes {
    static SIZES: OnceLock<CacheSizes> = OnceLock::new();
    #[cfg(test)]
    if let Some(sizes) = TEST_SIZES.with(std::cell::Cell::get) {
        return sizes;
    }
    *SIZES.get_or_init(read)
}

#[cfg(test)]
thread_local! {
    /// Sizes a unit test sets for its own thread (to make the loop nest slice k on small shapes).
    pub(crate) static TEST_SIZES: std::cell::Cell<Option<CacheSizes>> = const { std::cell::Cell::new(None) };
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
fn read() -> CacheSizes {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY (every cpuid below): leaves 0 and 0x80000000 exist on every x86-64 CPU, and a leaf
    // is read only when the maximum leaf they report covers it. (`__cpuid` is a safe function on
    // newer toolchains than this crate's minimum; the blocks keep older ones compiling.)
    #[allow(unused_unsafe)]
    let (max, max_ext) = unsafe { (__cpuid(0).eax, __cpuid(0x8000_0000).eax) };
    let leaf = if super::isa::vendor() == super::isa::Vendor::Amd {
        // 0x8000001D needs TOPOEXT (CPUID 0x80000001 ECX bit 22).
        #[allow(unused_unsafe)]
        let topoext = max_ext >= 0x8000_001d && unsafe { __cpuid(0x8000_0001).ecx } & (1 << 22) != 0;
        topoext.then_some(0x8000_001d)
    } else {
        (max >= 4).then_some(4)
    };
    let Some(leaf) = leaf else { return CacheSizes::ASSUMED };
    CacheSizes::from_descriptors((0..16).map(|sub| {
        #[allow(unused_unsafe)]
        let r = unsafe { __cpuid_count(leaf, sub) };
        [r.eax, r.ebx, r.ecx]
    }))
}

#[cfg(not(all(target_arch = "x86_64", not(miri))))]
fn read() -> CacheSizes {
    CacheSizes::ASSUMED
}

#[cfg(test)]
mod tests {
    use super::CacheSizes;

    /// A descriptor of a cache of `level` and `kind` with `ways`, `sets` and 64-byte lines.
    fn descriptor(kind: u32, level: u32, ways: u32, sets: u32) -> [u32; 3] {
        [kind | (level << 5), ((ways - 1) << 22) | 63, sets - 1]
    }

    #[test]
    fn descriptors_decode_to_ways_times_partitions_times_line_times_sets() {
        // An Intel Sapphire Rapids core: L1d 48 KiB 12-way, L1i 32 KiB, L2 2 MiB 16-way, L3 of
        // 105 MiB 15-way (as leaf 4 lists them), then the end marker.
        let spr = [
            descriptor(1, 1, 12, 64),
            descriptor(2, 1, 8, 64),
            descriptor(3, 2, 16, 2048),
            descriptor(3, 3, 15, 114_688),
            [0, 0, 0],
            descriptor(3, 2, 1, 1),
        ];
        let got = CacheSizes::from_descriptors(spr);
        assert_eq!((got.l1d, got.l2, got.l3), (48 << 10, 2 << 20, 105 << 20));
        assert!(got.from_cpuid);
        // An AMD Zen 4 core (leaf 0x8000001D): L1d 32 KiB 8-way, L2 1 MiB 8-way, L3 32 MiB 16-way;
        // partitions of 2 double a cache's size.
        let zen4 = [descriptor(1, 1, 8, 64), descriptor(3, 2, 8, 2048), descriptor(3, 3, 16, 32_768)];
        let got = CacheSizes::from_descriptors(zen4);
        assert_eq!((got.l1d, got.l2, got.l3), (32 << 10, 1 << 20, 32 << 20));
        let mut two = descriptor(3, 2, 8, 2048);
        two[1] |= 1 << 12;
        assert_eq!(CacheSizes::from_descriptors([two]).l2, 2 << 20);
    }

    #[test]
    fn no_descriptor_gives_the_assumed_sizes() {
        assert_eq!(CacheSizes::from_descriptors([]), CacheSizes::ASSUMED);
        assert_eq!(CacheSizes::from_descriptors([[0, 0, 0], descriptor(1, 1, 12, 64)]), CacheSizes::ASSUMED);
        assert_eq!(CacheSizes::from_descriptors([descriptor(2, 1, 8, 64)]), CacheSizes::ASSUMED);
    }

    #[test]
    fn this_cpu_reports_plausible_sizes() {
        let s = super::cache_sizes();
        // Every x86-64 CPU since 2003 has at least 16 KiB of L1d and 256 KiB of L2 per core; a
        // misread field (a count not plus one, a wrong shift) lands far outside these ranges.
        assert!((16 << 10..=1 << 20).contains(&s.l1d), "{s:?}");
        assert!((128 << 10..=64 << 20).contains(&s.l2) && s.l2 > s.l1d, "{s:?}");
        assert!(s.l3 == 0 || s.l3 >= s.l2, "{s:?}");
    }
}
