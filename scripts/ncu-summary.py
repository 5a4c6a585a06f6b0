#!/usr/bin/env python3
"""One line per profiled kernel from Nsight Compute's raw page, for scripts/gpu-check.sh's summary.

    ncu --import REPORT.ncu-rep --page raw --csv --print-units base > REPORT.csv
    python3 scripts/ncu-summary.py LABEL REPORT.csv

Prints, per kernel: its duration, the DRAM bytes it read and its DRAM throughput as a share of
the peak, shared-memory bank conflicts (loads and stores) and tensor-pipe activity. A metric that
this ncu did not collect prints as '-'; several names are tried for each, as they differ between
ncu versions and architectures.
"""
import csv
import sys

# Each quantity: (label, candidate metric names, scale from base units, format).
QUANTITIES = [
    ("time us", ["gpu__time_duration.sum"], 1e6, "{:.2f}"),
    ("DRAM read MB", ["dram__bytes_read.sum"], 1e-6, "{:.2f}"),
    ("DRAM % peak", ["dram__throughput.avg.pct_of_peak_sustained_elapsed",
                     "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"], 1, "{:.1f}"),
    ("smem ld conflicts", ["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
                           "smsp__sass_l1tex_data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"], 1, "{:.0f}"),
    ("smem st conflicts", ["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
                           "smsp__sass_l1tex_data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"], 1, "{:.0f}"),
    ("tensor pipe %", ["sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                       "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
                       "sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active"], 1, "{:.1f}"),
]


# Units ncu may print (by default it scales them), to seconds and bytes.
UNITS = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "byte": 1.0, "Kbyte": 1e3,
         "Mbyte": 1e6, "Gbyte": 1e9, "%": 1.0, "": 1.0}


def table(path):
    """The kernel rows of a raw-page CSV as dicts, and the units row (lines before the header,
    such as ncu's own messages, are skipped)."""
    with open(path, newline="") as f:
        lines = list(f)
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return [], {}
    parsed = list(csv.DictReader(lines[start:]))
    kernels = [r for r in parsed if r.get("Kernel Name")]
    # The row after the header holds the units (no kernel name).
    units = next((r for r in parsed if not r.get("Kernel Name")), {})
    return kernels, units


def number(text):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def describe(row, units):
    parts = []
    for label, names, scale, fmt in QUANTITIES:
        name = next((n for n in names if number(row.get(n)) is not None), None)
        value = None
        if name is not None and units.get(name, "") in UNITS:
            value = number(row[name]) * UNITS[units.get(name, "")] * scale
        parts.append(f"{label} {'-' if value is None else fmt.format(value)}")
    return ", ".join(parts)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: ncu-summary.py LABEL REPORT.csv")
    label, path = sys.argv[1], sys.argv[2]
    kernels, units = table(path)
    if not kernels:
        print(f"  ncu {label}: no kernel rows in {path}")
        return
    for row in kernels:
        name = row["Kernel Name"].split("(")[0]
        print(f"  ncu {label} {name}: {describe(row, units)}")


if __name__ == "__main__":
    main()
