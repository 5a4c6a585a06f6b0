#!/usr/bin/env python3
"""The `vera bench` suite timed in PyTorch, the peer a user would pick instead of vera-kernels.

fused_ms   PEFT's VeRA path: base + lambda_b * linear(lambda_d * linear(x, A), B) + bias
           (what peft.tuners.vera computes; torch has no fused kernel for it)
unfused_ms the same path (PEFT's path is the unfused one), reported for key parity
dense_ms   the dense baseline: form dW = (lambda_b[:, None] * B) @ (lambda_d[:, None] * A), then
           base + linear(x, dW) + bias

Run with the same thread count as `vera bench` (default: one per core), under torch.no_grad().
Prints one JSON object per case with the same keys as `vera bench --json`:
case, t, n, m, r, dtype, threads, isa, fused_ms, dense_ms, unfused_ms, fused_gflops.

    python3 benches/peers/torch_vera.py [--shape T,n,m,r ...] [--dtype f32|f16|bf16 ...]
                                        [--threads N] [--device cpu|cuda] [--budget-ms MS]
                                        [--no-dense]
"""
import argparse
import json
import os
import statistics
import sys
import time

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", type=parse_shape, help="T,n,m,r; repeatable")
    ap.add_argument("--dtype", action="append", choices=["f32", "f16", "bf16"], help="repeatable")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--budget-ms", type=float, default=300.0)
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense baseline (dense_ms: null); torch's f16 matmul on CPU can take seconds")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_vera.py: --device cuda but torch sees no CUDA device")
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    if args.device == "cpu":
        isa = "torch-" + torch.backends.cpu.get_cpu_capability().lower()
    else:
        isa = "torch-cuda-" + torch.cuda.get_device_name().replace(" ", "_")

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

            with torch.no_grad():
                def peft_path():
                    return base + lb * F.linear(ld * F.linear(x, a), b) + bias

                def dense():
                    dw = (lb[:, None] * b) @ (ld[:, None] * a)
                    return base + F.linear(x, dw) + bias

                if args.no_dense:
                    (fused_ms,) = medians([peft_path], args.budget_ms / 1e3, 5)
                    dense_ms = None
                else:
                    fused_ms, dense_ms = medians([peft_path, dense], args.budget_ms / 1e3, 5)
            print(json.dumps({
                "case": f"t{t}_n{n}_m{m}_r{r}", "t": t, "n": n, "m": m, "r": r, "dtype": name,
                "threads": args.threads, "isa": isa, "fused_ms": round(fused_ms, 6),
                "dense_ms": None if dense_ms is None else round(dense_ms, 6), "unfused_ms": round(fused_ms, 6),
                "fused_gflops": round(2 * t * r * (n + m) / (fused_ms * 1e-3) / 1e9, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
