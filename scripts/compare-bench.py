#!/usr/bin/env python3
"""Side by side: `vera bench --json` and `benches/peers/torch_vera.py` output for the same suite.

    python3 scripts/compare-bench.py VERA.json TORCH.json [--peak-line LINE] [--json OUT.json]
                                     [--key fused_ms|backward_ms|train_step_ms]

Prints one line per (case, dtype) present in both: both times of --key (default fused_ms, the
forward; backward_ms and train_step_ms with --backward), PyTorch / vera (above 1: vera is faster),
and for the forward of cases with T <= 8 (decode) the bandwidth of the bytes the call must move (A
and B slices, x, y read and written) as a share of the copy bandwidth in --peak-line when given.
"""
import argparse
import json
import re


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                row = json.loads(line)
                rows[(row["case"], row["dtype"])] = row
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("vera")
    ap.add_argument("torch")
    ap.add_argument("--peak-line", default="")
    ap.add_argument("--json")
    ap.add_argument("--key", default="fused_ms", choices=["fused_ms", "backward_ms", "train_step_ms"])
    args = ap.parse_args()
    key_ms = args.key
    vera, torch = load(args.vera), load(args.torch)
    peak = re.search(r"copy (\d+(?:\.\d+)?) GB/s", args.peak_line)
    copy_gbps = float(peak.group(1)) if peak else None
    size = {"f32": 4, "f16": 2, "bf16": 2}
    out = []
    print(f"{'case':<26} {'dtype':>5} {'vera ms':>10} {'torch ms':>10} {'torch/vera':>10} {'GB/s':>8} {'% copy bw':>9}")
    for key in sorted(vera, key=lambda k: (k[1], vera[k]["t"], k[0])):
        if key not in torch or key_ms not in vera[key] or key_ms not in torch[key]:
            continue
        v, t = vera[key], torch[key]
        n, m, r, tt = v["n"], v["m"], v["r"], v["t"]
        moved = (r * (n + m) + tt * n + 2 * tt * m) * size[v["dtype"]]
        gbps = moved / (v[key_ms] * 1e-3) / 1e9
        # The bytes above are the forward's: no bandwidth share for the training times.
        share = 100 * gbps / copy_gbps if copy_gbps and tt <= 8 and key_ms == "fused_ms" else None
        row = {
            "case": key[0], "dtype": key[1], "t": tt, "key": key_ms, "vera_ms": v[key_ms], "torch_ms": t[key_ms],
            "speedup_vs_torch": t[key_ms] / v[key_ms], "gbps": gbps, "copy_bw_share_pct": share,
        }
        out.append(row)
        share_s = f"{share:8.1f}%" if share is not None else f"{'-':>9}"
        print(f"{key[0]:<26} {key[1]:>5} {v[key_ms]:>10.4f} {t[key_ms]:>10.4f} "
              f"{row['speedup_vs_torch']:>9.2f}x {gbps:>8.0f} {share_s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": copy_gbps, "cases": out}, f, indent=1)


if __name__ == "__main__":
    main()
