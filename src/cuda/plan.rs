//! Which kernels a forward call launches, with what grid, and how the down-projection's k range is
//! split: a pure function of the shapes, so that it is tested without a device.

use crate::dtype::DType;

/// Token rows up to which the decode (matrix-vector) kernels are used.
pub(crate) const DECODE_MAX_ROWS: usize = 8;
/// `u` rows × r that the decode up-projection keeps in shared memory (`UP_SMEM_FLOATS`).
const DECODE_U_FLOATS: usize = 8192;
/// Warps per block of the decode down-projection (`GEMV_WARPS`), one row of A each.
const GEMV_WARPS: usize = 4;
/// Warps and outputs per block of the decode up-projection (`UP_WARPS`, `UP_ROWS`).
const UP_WARPS: usize = 8;
const UP_ROWS: usize = 32;
/// Tile of the prefill kernels (`BM` = `BN`) and the k granule of a split (`BK`).
const TILE: usize = 64;
const TILE_K: usize = 32;
/// The large tensor-core tiles (`BIG`), their threads (`Tile128::THREADS`) and the dynamic shared
/// memory their 4 stages take: 4 × (128 + 128) rows × 40 elements × 2 bytes (static-asserted in
/// kernels/vera_prefill.cu).
const BIG_TILE: usize = 128;
const BIG_TILE_THREADS: u32 = 256;
pub(crate) const TILE128_SMEM_BYTES: u32 = 81920;
/// Down-projection warps (decode) or tiles (prefill) to aim for, per streaming multiprocessor, before
/// the k range is split further. Decode is bound by memory latency × bandwidth: it needs many
/// 16-byte loads in flight, so half an SM's 64 warp slots.
const WARPS_PER_SM: usize = 32;
const TILES_PER_SM: usize = 2;

/// The environment variable that fixes the prefill kernels' tensor-core tiles: `64` or `128`
/// (read once per process; anything else, or unset, is [`Tiles::Auto`]).
pub(crate) const PREFILL_TILE_ENV: &str = "VERA_CUDA_PREFILL_TILE";
/// The environment variable that fixes which decode kernel sums the split partials: `down` or `up`
/// (read once per process; anything else, or unset, is [`SplitSum::Auto`]).
pub(crate) const DECODE_SPLIT_SUM_ENV: &str = "VERA_CUDA_DECODE_SPLIT_SUM";

/// The choices a plan leaves to measurement: the defaults ([`Options::AUTO`]), or fixed by the
/// environment ([`Options::from_env`]) to compare one against the other and to test each path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Options {
    pub tiles: Tiles,
    pub split_sum: SplitSum,
}

impl Options {
    pub(crate) const AUTO: Options = Options { tiles: Tiles::Auto, split_sum: SplitSum::Auto };

    /// [`PREFILL_TILE_ENV`] and [`DECODE_SPLIT_SUM_ENV`], read the first time they are asked for.
    pub(crate) fn from_env() -> Options {
        static CHOICE: std::sync::OnceLock<Options> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            let var = |name| std::env::var(name).unwrap_or_default();
            let mut options = Options::AUTO;
            match var(PREFILL_TILE_ENV).as_str() {
                "64" => options.tiles = Tiles::Small,
                "128" => options.tiles = Tiles::Large,
                _ => {}
            }
            match var(DECODE_SPLIT_SUM_ENV).as_str() {
                "down" => options.split_sum = SplitSum::Down,
                "up" => options.split_sum = SplitSum::Up,
                _ => {}
            }
            options
        })
    }
}

/// Which decode kernel sums the down-projection's split partials into `u`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SplitSum {
    /// The up-projection while the partials each of its blocks reads (all of them: `splits · TT · r`
    /// floats, from L2) are no more bytes than its rows of B (from memory); the down-projection
    /// otherwise.
    Auto,
    /// The down-projection's last block of each group of outputs (a counter per group, a fence and
    /// an atomic per block), which writes `u` once.
    Down,
    /// Every up-projection block, in its prologue: no counters and no last block on the way from one
    /// kernel to the next, but each block reads every partial.
    Up,
}

/// Which tiles the 16-bit prefill kernels use (f32 always has its 64 × 64 CUDA-core tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tiles {
    /// 128 × 128 for a product with at least a wave of them (one per multiprocessor), where each
    /// byte the larger tile brings into shared memory feeds twice the mma (and each mma takes a
    /// quarter fewer ldmatrix); 64 × 64 otherwise, where the larger tile would leave
    /// multiprocessors idle.
    Auto,
    /// 64 × 64 always (`VERA_CUDA_PREFILL_TILE=64`): to compare against.
    Small,
    /// 128 × 128 always (`VERA_CUDA_PREFILL_TILE=128`): to compare, and to test them on small shapes.
    Large,
}

impl Tiles {
    /// The tile edge for a product of `rows × cols` outputs on `sms` multiprocessors.
    fn edge(self, dtype: DType, rows: usize, cols: usize, sms: usize) -> usize {
        let large = dtype != DType::F32
            && match self {
                Tiles::Auto => rows.div_ceil(BIG_TILE) * cols.div_ceil(BIG_TILE) >= sms,
                Tiles::Small => false,
                Tiles::Large => true,
            };
        if large {
            BIG_TILE
        } else {
            TILE
        }
    }
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes (the large tiles' pipeline stages).
    pub shared_bytes: u32,
    /// Launched as a programmatic dependent of the launch before it, where the device has them
    /// (sm_90): it may start while that one runs, and waits for it before reading its results
    /// (`wait_for_previous_grid` in kernels/ptx.cuh).
    pub dependent: bool,
}

/// The two launches of a forward call and the split of the down-projection's k range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub down: Launch,
    pub up: Launch,
    /// Number of k splits (partial sums per u element).
    pub splits: usize,
    /// k elements per split.
    pub k_split: usize,
    /// Counter groups of the down-projection (blocks that share outputs across splits).
    pub groups: usize,
    /// Whether u is kept in f32 (the decode kernels) rather than in the dtype (the tile kernels).
    pub u_f32: bool,
    /// Whether the up-projection sums the split partials into u itself (decode, with `splits > 1`):
    /// the down-projection then only writes them, and uses no counters.
    pub up_sums_splits: bool,
    /// Row stride of u, in elements: r, or r rounded up to 8 so that the tile kernels' 16-byte
    /// loads of u rows stay aligned.
    pub ldu: usize,
}

pub(crate) fn grid_dim(v: usize) -> u32 {
    // Shapes were checked to fit in i32 before planning, so every grid dimension fits in u32.
    u32::try_from(v).expect("grid dimension checked by the caller")
}

/// `(splits, k_split)`: at least `want` splits' worth of parallelism over `n`, each split a multiple
/// of `granule` and at least `min_len` long.
pub(crate) fn split_k(n: usize, want: usize, granule: usize, min_len: usize) -> (usize, usize) {
    let max_splits = n.div_ceil(min_len).max(1);
    let splits = want.clamp(1, max_splits);
    let k_split = n.div_ceil(splits).div_ceil(granule).max(1) * granule;
    (n.div_ceil(k_split).max(1), k_split)
}

/// The row counts the decode kernels are instantiated for (`vera_*_gemv_t{tt}_*`).
const DECODE_TILES: [usize; 4] = [1, 2, 4, 8];

/// Every kernel a [`plan`] (or a backward plan) can name, for every dtype: what the device resolves
/// when it opens, so that a missing or bad kernel image is an error there, not at some later launch.
// Only a GPU resolves kernels up front; the emulator looks each up by name at launch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let name = dtype.name();
        for tt in DECODE_TILES {
            names.push(format!("vera_down_gemv_t{tt}_{name}"));
            names.push(format!("vera_up_gemv_t{tt}_{name}"));
        }
        names.push(format!("vera_down_tile_{name}"));
        names.push(format!("vera_up_tile_{name}"));
    }
    names.extend(dynamic_smem_kernels().into_iter().map(|(name, _)| name));
    names.extend(super::backward::kernel_names());
    names
}

/// The kernels that take dynamic shared memory past the 48 KiB a kernel gets without asking, with
/// the bytes they are launched with: the device raises each one's limit to that when it opens.
pub(crate) fn dynamic_smem_kernels() -> Vec<(String, u32)> {
    let mut kernels = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for op in ["down", "up"] {
            kernels.push((format!("vera_{op}_tile128_{}", dtype.name()), TILE128_SMEM_BYTES));
        }
    }
    kernels
}

/// The plan for `rows` token rows of a layer `n → m` at rank `r` on a device with `sms`
/// multiprocessors, with the choices `options`.
pub(crate) fn plan(dtype: DType, rows: usize, n: usize, r: usize, m: usize, sms: usize, options: Options) -> Plan {
    let name = dtype.name();
    let decode_tt = DECODE_TILES.into_iter().find(|&tt| tt >= rows);
    if let Some(tt) = decode_tt.filter(|&tt| rows <= DECODE_MAX_ROWS && tt * r <= DECODE_U_FLOATS) {
        let lane_k = 32 * 16 / dtype.size_bytes();
        let rows_of_a = r.div_ceil(GEMV_WARPS);
        let want = (sms * WARPS_PER_SM).div_ceil(r);
        let (splits, k_split) = split_k(n, want, lane_k, lane_k);
        let up_sums_splits = splits > 1
            && match options.split_sum {
                // A block's partials (f32) against its UP_ROWS rows of B (the dtype).
                SplitSum::Auto => splits * tt * r * 4 <= UP_ROWS * r * dtype.size_bytes(),
                SplitSum::Down => false,
                SplitSum::Up => true,
            };
        return Plan {
            down: Launch {
                kernel: format!("vera_down_gemv_t{tt}_{name}"),
                grid: [grid_dim(rows_of_a), grid_dim(splits), 1],
                block: [32 * GEMV_WARPS as u32, 1, 1],
                shared_bytes: 0,
                dependent: false,
            },
            up: Launch {
                kernel: format!("vera_up_gemv_t{tt}_{name}"),
                grid: [grid_dim(m.div_ceil(UP_ROWS)), 1, 1],
                block: [32 * UP_WARPS as u32, 1, 1],
                shared_bytes: 0,
                // Streams B into L2 while the down-projection runs (kernels/vera_decode.cu).
                dependent: true,
            },
            splits,
            k_split,
            groups: rows_of_a,
            u_f32: true,
            up_sums_splits,
            ldu: r,
        };
    }
    // The tile kernels launch one block per tile, (row tiles, column tiles); each block takes the
    // tile at its place in launch order, in the order the kernels choose for L2 reuse
    // (`tile_in_order` in kernels/vera_prefill.cu). Each product has its own tile size.
    let tile_launch = |op: &str, edge: usize, cols: usize, splits: usize| {
        let (tile, threads, shared_bytes) = match (dtype, edge) {
            (DType::F32, _) => ("tile", 256, 0),
            (_, BIG_TILE) => ("tile128", BIG_TILE_THREADS, TILE128_SMEM_BYTES),
            _ => ("tile", 128, 0),
        };
        Launch {
            kernel: format!("vera_{op}_{tile}_{name}"),
            grid: [grid_dim(rows.div_ceil(edge)), grid_dim(cols.div_ceil(edge)), grid_dim(splits)],
            block: [threads, 1, 1],
            shared_bytes,
            dependent: false,
        }
    };
    let tiles = options.tiles;
    let (down_edge, up_edge) = (tiles.edge(dtype, rows, r, sms), tiles.edge(dtype, rows, m, sms));
    let down_tiles = rows.div_ceil(down_edge) * r.div_ceil(down_edge);
    let want = (sms * TILES_PER_SM).div_ceil(down_tiles);
    let (splits, k_split) = split_k(n, want, TILE_K, 8 * TILE_K);
    Plan {
        down: tile_launch("down", down_edge, r, splits),
        up: tile_launch("up", up_edge, m, 1),
        splits,
        k_split,
        groups: down_tiles,
        u_f32: dtype == DType::F32,
        up_sums_splits: false,
        ldu: r.next_multiple_of(8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launch shapes here must match the kernels' compile-time constants.
    #[test]
    fn constants_match_the_kernel_sources() {
        let decode = include_str!("../../kernels/vera_decode.cu");
        let prefill = include_str!("../../kernels/vera_prefill.cu");
        for (source, name, value) in [
            (decode, "GEMV_WARPS", GEMV_WARPS),
            (decode, "UP_WARPS", UP_WARPS),
            (decode, "UP_ROWS", UP_ROWS),
            (decode, "UP_SMEM_FLOATS", DECODE_U_FLOATS),
            (prefill, "BM", TILE),
            (prefill, "BN", TILE),
            (prefill, "BK", TILE_K),
            (prefill, "BIG", BIG_TILE),
        ] {
            let decl = format!("constexpr int {name} = {value};");
            assert!(source.contains(&decl), "kernels do not declare `{decl}`");
        }
    }

    #[test]
    fn splits_cover_k_exactly_once() {
        for n in [0, 1, 7, 255, 256, 257, 4096, 11008] {
            for want in [1, 2, 3, 64, 1000] {
                let (splits, k_split) = split_k(n, want, 32, 256);
                assert!(splits >= 1 && k_split % 32 == 0 && k_split >= 32, "n {n} want {want}");
                assert!(splits * k_split >= n, "splits must cover k: n {n} want {want}");
                assert!((splits - 1) * k_split < n.max(1), "no empty split: n {n} want {want}");
            }
        }
    }

    #[test]
    fn decode_and_prefill_are_chosen_by_rows_and_shared_memory() {
        let p = plan(DType::BF16, 1, 4096, 256, 4096, 132, Options::AUTO);
        assert_eq!(p.down.kernel, "vera_down_gemv_t1_bf16");
        assert_eq!(p.up.kernel, "vera_up_gemv_t1_bf16");
        // 256 rows of A over 4 warps per block. 32 warps per SM want ⌈4224 / 256⌉ = 17 splits; a
        // split is at least the 256-element lane step, so 16 splits of 256.
        assert_eq!(p.down.grid, [64, 16, 1]);
        assert_eq!((p.splits, p.k_split), (16, 256));
        assert_eq!(p.up.grid, [128, 1, 1]);
        // Only the decode up-projection reads its predecessor's results after a grid wait.
        assert!(p.up.dependent && !p.down.dependent);
        let p = plan(DType::F16, 5, 100, 40, 70, 132, Options::AUTO);
        assert_eq!(p.down.kernel, "vera_down_gemv_t8_f16");
        // u would not fit in shared memory: 8 rows x 1025 > 8192.
        assert_eq!(plan(DType::F32, 8, 64, 1025, 64, 132, Options::AUTO).down.kernel, "vera_down_tile_f32");
        let p = plan(DType::BF16, 512, 4096, 256, 4096, 132, Options::AUTO);
        assert_eq!(p.down.kernel, "vera_down_tile_bf16");
        assert_eq!(p.up.grid, [8, 64, 1]);
        assert_eq!(p.down.grid, [8, 4, p.splits as u32]);
        assert!(!p.up.dependent && !p.down.dependent);
        assert!(p.splits > 1 && p.k_split * p.splits >= 4096);
    }

    const LARGE: Options = Options { tiles: Tiles::Large, ..Options::AUTO };
    const SMALL: Options = Options { tiles: Tiles::Small, ..Options::AUTO };

    #[test]
    fn the_up_projection_sums_the_decode_splits_while_they_are_fewer_bytes_than_its_rows_of_b() {
        // T = 1, r = 256: 16 splits of 1 x 256 f32 (16 KiB) per block against 32 rows of B (16 KiB).
        let p = plan(DType::BF16, 1, 4096, 256, 4096, 132, Options::AUTO);
        assert_eq!((p.splits, p.up_sums_splits), (16, true));
        // T = 2 (the t2 kernels): 32 KiB of partials: the down-projection's last blocks sum them.
        assert!(!plan(DType::BF16, 2, 4096, 256, 4096, 132, Options::AUTO).up_sums_splits);
        // T = 1, r = 1024: 4 splits (16 KiB) against 64 KiB of B; f32's B rows are twice the bytes.
        assert!(plan(DType::F16, 1, 4096, 1024, 4096, 132, Options::AUTO).up_sums_splits);
        assert!(plan(DType::F32, 2, 4096, 256, 4096, 132, Options::AUTO).up_sums_splits);
        // Fixed either way; never without splits, nor on the tile kernels.
        let up = Options { split_sum: SplitSum::Up, ..Options::AUTO };
        let down = Options { split_sum: SplitSum::Down, ..Options::AUTO };
        assert!(plan(DType::BF16, 8, 4096, 1024, 4096, 132, up).up_sums_splits);
        assert!(!plan(DType::BF16, 1, 4096, 256, 4096, 132, down).up_sums_splits);
        assert!(!plan(DType::BF16, 1, 256, 256, 4096, 132, up).up_sums_splits);
        assert!(!plan(DType::BF16, 64, 4096, 256, 4096, 132, up).up_sums_splits);
    }

    #[test]
    fn large_tiles_for_a_product_with_a_wave_of_them() {
        // T = 4096, m = 4096: 32 x 32 tiles of 128 for 132 SMs; the down-projection's u (r = 256)
        // has 32 x 2 of them, so it stays on 64 x 64 tiles (and splits k).
        let p = plan(DType::BF16, 4096, 4096, 256, 4096, 132, Options::AUTO);
        assert_eq!((p.up.kernel.as_str(), p.up.grid, p.up.block), ("vera_up_tile128_bf16", [32, 32, 1], [256, 1, 1]));
        assert_eq!(p.up.shared_bytes, TILE128_SMEM_BYTES);
        assert_eq!((p.down.kernel.as_str(), p.down.shared_bytes), ("vera_down_tile_bf16", 0));
        assert_eq!(p.groups, 64 * 4);
        // r = 1024: 32 x 8 tiles of 128, a group (counter) per tile.
        let p = plan(DType::F16, 4096, 4096, 1024, 4096, 132, Options::AUTO);
        assert_eq!((p.down.kernel.as_str(), p.down.grid[..2].to_vec()), ("vera_down_tile128_f16", vec![32, 8]));
        assert_eq!(p.groups, 32 * 8);
        // T = 512, m = 4096: 4 x 32 = 128 tiles of 128 would leave 4 SMs idle.
        assert_eq!(plan(DType::BF16, 512, 4096, 256, 4096, 132, Options::AUTO).up.kernel, "vera_up_tile_bf16");
        // Forced either way, but never for f32 (no tensor-core tiles) nor decode.
        let p = plan(DType::BF16, 9, 100, 10, 70, 132, LARGE);
        assert_eq!((p.down.kernel.as_str(), p.up.kernel.as_str()), ("vera_down_tile128_bf16", "vera_up_tile128_bf16"));
        assert_eq!((p.down.grid, p.up.grid), ([1, 1, p.splits as u32], [1, 1, 1]));
        assert_eq!(plan(DType::BF16, 4096, 4096, 256, 4096, 132, SMALL).up.kernel, "vera_up_tile_bf16");
        assert_eq!(plan(DType::F32, 4096, 4096, 256, 4096, 132, LARGE).up.kernel, "vera_up_tile_f32");
        assert_eq!(plan(DType::F16, 8, 4096, 256, 4096, 132, LARGE).up.kernel, "vera_up_gemv_t8_f16");
        for (name, bytes) in dynamic_smem_kernels() {
            assert!(name.contains("tile128") && bytes > 48 * 1024, "{name}: {bytes}");
        }
    }

    #[test]
    fn every_planned_kernel_is_in_the_list_the_device_resolves_at_open() {
        let names = kernel_names();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for rows in [1, 2, 3, 5, 8, 9, 64, 4096] {
                for (n, r, m) in [(64, 16, 64), (4096, 256, 4096), (4096, 1024, 11008), (768, 2048, 768)] {
                    for (sms, tiles) in [(1, Tiles::Auto), (132, Tiles::Auto), (132, Tiles::Small), (132, Tiles::Large)]
                    {
                        let p = plan(dtype, rows, n, r, m, sms, Options { tiles, ..Options::AUTO });
                        assert!(names.contains(&p.down.kernel), "{} not listed", p.down.kernel);
                        assert!(names.contains(&p.up.kernel), "{} not listed", p.up.kernel);
                    }
                }
            }
        }
        // The forward's (and the large tiles' of the 16-bit types), then the backward's (4 per dtype
        // and 3 f32-only steps), each once.
        assert_eq!(names.len(), 3 * (2 * DECODE_TILES.len() + 2) + 2 * 2 + 3 * 4 + 3);
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }
}
