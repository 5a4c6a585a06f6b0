#!/usr/bin/env python3
"""Old vs new `vera` binaries on the same suite, interleaved, medians per case.

    python3 scripts/ab-bench.py OLD_VERA NEW_VERA [--rounds 5] [BENCH ARGS...]

Runs `OLD bench --no-dense --json ARGS`, then `NEW ...`, alternating for --rounds rounds (the
machines here are shared and noisy: interleaving spreads the noise over both), and prints per
(case, dtype) the median fused and unfused times of each and new / old (below 1: the new binary is
faster), the median of the back-to-back ratios ("paired"), and the largest paired slowdown of the
fused path. With --per-case, each case of the suite is
run on its own, old and new alternating --rounds times before the next case, so that both see the
same minutes of a noisy host.
"""
import argparse
import json
import statistics
import subprocess


def run(binary, args):
    out = subprocess.run([binary, "bench", "--no-dense", "--json", *args], check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-case", action="store_true")
    a, rest = ap.parse_known_args()
    args = [x for x in rest if x != "--"]
    times = {"old": {}, "new": {}}
    if a.per_case:
        # The suite the arguments select, from one quick run; then the other arguments per case.
        quick = [x for i, x in enumerate(args) if x != "--budget-ms" and (i == 0 or args[i - 1] != "--budget-ms")]
        suite = [(f"{r['t']},{r['n']},{r['m']},{r['r']}", r["dtype"]) for r in run(a.old, [*quick, "--budget-ms", "1"])]
        base = [x for i, x in enumerate(args) if x not in ("--shape", "--dtype") and (i == 0 or args[i - 1] not in ("--shape", "--dtype"))]
        runs = [[*base, "--shape", shape, "--dtype", dtype] for shape, dtype in suite]
    else:
        runs = [args]
    for case_args in runs:
        for i in range(a.rounds):
            # Which binary goes first alternates, so that an order effect (the second run of a pair
            # seeing a warmer or a busier machine) falls on both alike.
            pair = (("old", a.old), ("new", a.new))
            for name, binary in pair if i % 2 == 0 else pair[::-1]:
                for row in run(binary, case_args):
                    key = (row["case"], row["dtype"])
                    times[name].setdefault(key, []).append((row["fused_ms"], row["unfused_ms"]))
    print(
        f"{'case':28} {'dtype':5} {'old fused':>10} {'new fused':>10} {'new/old':>8} {'paired':>7}"
        f" {'old unf':>9} {'new unf':>9} {'new/old':>8}"
    )
    worst = 0.0
    for key in times["old"]:
        med = {n: [statistics.median(v[i] for v in times[n][key]) for i in (0, 1)] for n in ("old", "new")}
        fused, unfused = med["new"][0] / med["old"][0], med["new"][1] / med["old"][1]
        # The median of the ratios of back-to-back runs: each pair saw the same minute of the host.
        paired = statistics.median(n[0] / o[0] for o, n in zip(times["old"][key], times["new"][key]))
        worst = max(worst, paired)
        print(
            f"{key[0]:28} {key[1]:5} {med['old'][0]:10.3f} {med['new'][0]:10.3f} {fused:8.3f} {paired:7.3f}"
            f" {med['old'][1]:9.3f} {med['new'][1]:9.3f} {unfused:8.3f}"
        )
    print(f"rounds {a.rounds}; largest paired fused new/old: {worst:.3f}")


if __name__ == "__main__":
    main()
