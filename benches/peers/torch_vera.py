#!/usr/bin/env python3
"""The `vera bench` suite timed in PyTorch, the peer a user would pick instead of vera-kernels.

fused_ms   PEFT's VeRA path: base + lambda_b * linear(lambda_d * linear(x, A), B) + bias
           (what peft.tuners.vera computes; torch has no fused kernel for it)
unfused_ms the same path (PEFT's path is the unfused one), reported for key parity
dense_ms   the dense baseline: form dW = (lambda_b[:, None] * B) @ (lambda_d[:, None] * A), then
           base + linear(x, dW) + bias

backward_ms, train_step_ms (with --backward) PyTorch autograd through PEFT's formula, lambda_d,
           lambda_b and x requiring grad: the backward of y with an upstream gradient dy alone (on a
           graph kept with retain_graph), and a whole step (forward, then backward)

--adapters K (K > 1) times many adapters in one batch: K distinct adapters (their own lambda_d [r]
and lambda_b [m], drawn at random; the same A and B, as VeRA shares them) spread over the T rows,
row t going to adapter t % K. It is timed as a PEFT user serves such a batch today: y = base + bias,
then for each adapter that has rows, gather them (index_select), apply PEFT's formula
lambda_b * linear(lambda_d * linear(x_k, A), B) and add the result into y at those rows
(index_add_); the row index of each adapter is built once per case, outside the timing. The row
then has case <shape>_k<K>, adapters: K, fused_ms (= unfused_ms) that loop, single_ms the
single-adapter path on the same T rows timed in the same run (round-robin with the loop on the
CPU), loop_over_single = fused_ms / single_ms, and dense_ms null (the dense baseline is
single-adapter). --adapters 1 (the default) is the single-adapter run above, rows unchanged.

Run with the same thread count as `vera bench` (default: one per core), under torch.no_grad()
(except the autograd timings of --backward).
Prints one JSON object per case with the same keys as `vera bench --json`:
case, t, n, m, r, dtype, threads, isa, fused_ms, dense_ms, unfused_ms, fused_gflops.

On the CPU, methods are timed round-robin with the host clock, like `vera bench`. With --device
cuda, each method is timed as `vera bench --device cuda` times the fused kernel
(src/bin/vera/bench_cuda.rs): WARMUP_CALLS untimed calls (and at least one pass over the rotated
copies), then each sample is one call between two CUDA events, waited for before the next call,
until MIN_SAMPLES samples and the budget have passed (or MAX_SAMPLES); the median is reported.
--l2 cold (cuda only) rotates the calls over copies of A and B that fill COLD_FOOTPRINT_L2S times
the GPU's L2, so A and B come from device memory; those cases are named <shape>_l2cold.

    python3 benches/peers/torch_vera.py [--shape T,n,m,r ...] [--dtype f32|f16|bf16 ...]
                                        [--threads N] [--device cpu|cuda] [--budget-ms MS]
                                        [--no-dense] [--l2 warm|cold] [--backward]
                                        [--adapters K]
"""
import argparse
import json
import os
import statistics
import sys
import time

# The GPU timing protocol; the same numbers as src/bin/vera/bench_cuda.rs.
WARMUP_CALLS = 10
MIN_SAMPLES = 50
MAX_SAMPLES = 2000
COLD_FOOTPRINT_L2S = 4
MAX_COLD_COPIES = 256
# When torch does not report the L2 size: an H100/H200's.
DEFAULT_L2_BYTES = 50 << 20

DEFAULT_SUITE = [
    (1, 4096, 4096, 256),
    (8, 4096, 4096, 1024),
    (512, 4096, 4096, 256),
    (512, 4096, 4096, 1024),
    (512, 4096, 11008, 256),
    (512, 768, 768, 1024),
]


def parse_shape(s):
    parts = s.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected T,n,m,r (four positive sizes), got {s!r}")
    return tuple(int(p) for p in parts)


def cold_copies(set_bytes, l2_bytes):
    """Copies of A and B to rotate through so that none is in L2 when a call reads it."""
    want = -(-COLD_FOOTPRINT_L2S * l2_bytes // max(set_bytes, 1))
    return min(max(want, 2), MAX_COLD_COPIES)


def cuda_median_ms(torch, fn, sets, budget_s):
    """The median device time of one call of fn(set), rotating over sets; and the sample count."""
    start_ev = torch.cuda.Event(enable_timing=True)
    end_ev = torch.cuda.Event(enable_timing=True)
    calls = 0
    for _ in range(max(WARMUP_CALLS, len(sets))):
        fn(sets[calls % len(sets)])
        calls += 1
    torch.cuda.synchronize()
    samples = []
    started = time.perf_counter()
    while len(samples) < MIN_SAMPLES or (time.perf_counter() - started < budget_s and len(samples) < MAX_SAMPLES):
        s = sets[calls % len(sets)]
        calls += 1
        start_ev.record()
        fn(s)
        end_ev.record()
        end_ev.synchronize()
        samples.append(start_ev.elapsed_time(end_ev))
    # The upper median for an even count, as bench_cuda.rs takes it.
    return sorted(samples)[len(samples) // 2], len(samples)


def time_training(torch, F, args, medians, tensors, dy):
    """Autograd through PEFT's formula: (the backward alone, a whole step) in ms."""
    a, b, ld, lb, bias, x, base = tensors
    x, ld, lb = (v.clone().requires_grad_(True) for v in (x, ld, lb))
    leaves = (x, ld, lb)

    def forward():
        return base + lb * F.linear(ld * F.linear(x, a), b) + bias

    def step():
        for v in leaves:
            v.grad = None
        forward().backward(dy)

    kept = forward()

    def backward_only():
        for v in leaves:
            v.grad = None
        kept.backward(dy, retain_graph=True)

    if args.device == "cuda":
        budget_s = args.budget_ms / 1e3
        return (cuda_median_ms(torch, lambda _: backward_only(), [None], budget_s)[0],
                cuda_median_ms(torch, lambda _: step(), [None], budget_s)[0])
    return tuple(medians([backward_only, step], args.budget_ms / 1e3, 5))


def time_adapters(torch, F, args, medians, mk, dev, shape, dtype_name, isa, l2_bytes, tensors):
    """--adapters K: the per-adapter loop a PEFT user runs on a mixed batch, and the single-adapter
    path on the same rows, in one run; the JSON row of the case."""
    t, n, m, r = shape
    a, b, ld, lb, bias, x, base = tensors
    k_count = args.adapters
    # Adapter 0 is the single-adapter case's; the others draw their own vectors.
    lds = [ld] + [mk(r) for _ in range(k_count - 1)]
    lbs = [lb] + [mk(m) for _ in range(k_count - 1)]
    # Row t -> adapter t % K; adapters without a row (K > T) are not run.
    groups = [(torch.arange(k, t, k_count, device=dev), lds[k], lbs[k]) for k in range(min(k_count, t))]
    case = f"t{t}_n{n}_m{m}_r{r}_k{k_count}" + ("_l2cold" if args.l2 == "cold" else "")

    with torch.no_grad():
        def single(ab):
            return base + lb * F.linear(ld * F.linear(x, ab[0]), ab[1]) + bias

        def loop(ab):
            y = base + bias
            for idx, ld_k, lb_k in groups:
                x_k = x.index_select(0, idx)
                y.index_add_(0, idx, lb_k * F.linear(ld_k * F.linear(x_k, ab[0]), ab[1]))
            return y

        # Once, untimed: the loop gives every row its own adapter's output (the same formula with
        # the per-row vectors gathered up front).
        rows = torch.arange(t, device=dev) % k_count
        want = base + torch.stack(lbs)[rows] * F.linear(torch.stack(lds)[rows] * F.linear(x, a), b) + bias
        got = loop((a, b))
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
        if not err <= (1e-4 if dtype_name == "f32" else 2e-2):
            sys.exit(f"torch_vera.py: --adapters {k_count} loop disagrees with the per-row formula: {err:.2e}")

        if args.device == "cuda":
            set_bytes = (a.numel() + b.numel()) * a.element_size()
            copies = cold_copies(set_bytes, l2_bytes) if args.l2 == "cold" else 1
            sets = [(a, b)] + [(a.clone(), b.clone()) for _ in range(copies - 1)]
            budget_s = args.budget_ms / 1e3
            loop_ms, _ = cuda_median_ms(torch, loop, sets, budget_s)
            single_ms, _ = cuda_median_ms(torch, single, sets, budget_s)
            del sets
        else:
            # Round-robin in one run, so that machine noise falls on both alike.
            loop_ms, single_ms = medians([lambda: loop((a, b)), lambda: single((a, b))], args.budget_ms / 1e3, 5)
    return {
        "case": case, "t": t, "n": n, "m": m, "r": r, "dtype": dtype_name,
        "threads": args.threads, "isa": isa, "adapters": k_count, "fused_ms": round(loop_ms, 6),
        "dense_ms": None, "unfused_ms": round(loop_ms, 6),
        "fused_gflops": round(2 * t * r * (n + m) / (loop_ms * 1e-3) / 1e9, 3),
        "single_ms": round(single_ms, 6), "loop_over_single": round(loop_ms / single_ms, 4),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", type=parse_shape, help="T,n,m,r; repeatable")
    ap.add_argument("--dtype", action="append", choices=["f32", "f16", "bf16"], help="repeatable")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--budget-ms", type=float, default=300.0)
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense baseline (dense_ms: null); torch's f16 matmul on CPU can take seconds")
    ap.add_argument("--l2", choices=["warm", "cold"], default="warm",
                    help="cuda only: cold rotates each call over copies of A and B filling several L2s")
    ap.add_argument("--backward", action="store_true",
                    help="also time autograd: backward_ms (the backward alone) and train_step_ms")
    ap.add_argument("--adapters", type=int, default=1, metavar="K",
                    help="K distinct adapters (own lambda_d, lambda_b; shared A, B) over the T rows, row t "
                         "going to adapter t %% K, timed as a PEFT user's loop: per adapter, gather its rows "
                         "(index_select), apply PEFT's formula, add into y (index_add_); also times the "
                         "single-adapter path on the same rows in the same run and reports loop_over_single "
                         "(default 1: the single-adapter run alone)")
    args = ap.parse_args()
    if args.l2 == "cold" and args.device != "cuda":
        ap.error("--l2 cold: only with --device cuda")
    if args.adapters < 1:
        ap.error("--adapters: K must be at least 1")
    if args.adapters > 1 and args.backward:
        ap.error("--backward: single adapter only (--adapters 1)")

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_vera.py: --device cuda but torch sees no CUDA device")
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    if args.device == "cpu":
        isa = "torch-" + torch.backends.cpu.get_cpu_capability().lower()
        l2_bytes = None
    else:
        isa = "torch-cuda-" + torch.cuda.get_device_name().replace(" ", "_")
        l2_bytes = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or DEFAULT_L2_BYTES

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def medians(fns, budget_s, min_runs):
        # Round-robin like vera bench, so machine noise falls on every method alike; each method is
        # called twice per round and the second call is timed, so each is timed warm.
        times = [[] for _ in fns]
        start = time.perf_counter()
        while len(times[0]) < min_runs or (time.perf_counter() - start < budget_s and len(times[0]) < 1000):
            for f, ts in zip(fns, times):
                f()
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                ts.append((time.perf_counter() - t0) * 1e3)
        return [statistics.median(ts) for ts in times]

    for name in args.dtype or ["f32", "f16", "bf16"]:
        dt = dtypes[name]
        for (t, n, m, r) in args.shape or DEFAULT_SUITE:
            g = torch.Generator().manual_seed(0)
            mk = lambda *s: (torch.rand(*s, generator=g) * 2 - 1).to(dev, dt)
            a, b = mk(r, n), mk(m, r)
            ld, lb, bias = mk(r), mk(m), mk(m)
            x, base = mk(t, n), mk(t, m)
            case = f"t{t}_n{n}_m{m}_r{r}" + ("_l2cold" if args.l2 == "cold" else "")
            if args.adapters > 1:
                print(json.dumps(time_adapters(torch, F, args, medians, mk, dev, (t, n, m, r), name, isa, l2_bytes,
                                               (a, b, ld, lb, bias, x, base))), flush=True)
                continue

            with torch.no_grad():
                def peft_path(ab):
                    return base + lb * F.linear(ld * F.linear(x, ab[0]), ab[1]) + bias

                def dense(ab):
                    dw = (lb[:, None] * ab[1]) @ (ld[:, None] * ab[0])
                    return base + F.linear(x, dw) + bias

                if args.device == "cuda":
                    set_bytes = (a.numel() + b.numel()) * a.element_size()
                    copies = cold_copies(set_bytes, l2_bytes) if args.l2 == "cold" else 1
                    sets = [(a, b)] + [(a.clone(), b.clone()) for _ in range(copies - 1)]
                    budget_s = args.budget_ms / 1e3
                    fused_ms, _ = cuda_median_ms(torch, peft_path, sets, budget_s)
                    dense_ms = None if args.no_dense else cuda_median_ms(torch, dense, sets, budget_s)[0]
                    del sets
                elif args.no_dense:
                    (fused_ms,) = medians([lambda: peft_path((a, b))], args.budget_ms / 1e3, 5)
                    dense_ms = None
                else:
                    # Each method in rounds of its own, as `vera bench` times them (a call after a
                    # dense one would find the cache as the dense m x n ΔW left it).
                    (fused_ms,) = medians([lambda: peft_path((a, b))], args.budget_ms / 1e3, 5)
                    (dense_ms,) = medians([lambda: dense((a, b))], args.budget_ms / 1e3, 3)
            row = {
                "case": case, "t": t, "n": n, "m": m, "r": r, "dtype": name,
                "threads": args.threads, "isa": isa, "fused_ms": round(fused_ms, 6),
                "dense_ms": None if dense_ms is None else round(dense_ms, 6), "unfused_ms": round(fused_ms, 6),
                "fused_gflops": round(2 * t * r * (n + m) / (fused_ms * 1e-3) / 1e9, 3),
            }
            if args.backward:
                backward_ms, step_ms = time_training(torch, F, args, medians, (a, b, ld, lb, bias, x, base), mk(t, m))
                row["backward_ms"], row["train_step_ms"] = round(backward_ms, 6), round(step_ms, 6)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
