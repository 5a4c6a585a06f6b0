#!/usr/bin/env bash
# The GPU check, in two halves, because the GPU machine has no Rust toolchain and no network:
#
#   bash scripts/gpu-check.sh build     # here: builds the GPU test and bench binaries (feature cuda)
#                                       # into target/gpu-bundle/ (carry that folder to the GPU machine)
#   bash scripts/gpu-check.sh run       # there, from the repository root, with OUT set to a folder:
#                                       # the GPU tests against the reference, then `vera bench
#                                       # --device cuda` and PyTorch/PEFT's path on the same suite
#
# `run` needs the NVIDIA driver (libcuda; set LD_LIBRARY_PATH if it is not found) and, for the
# PyTorch side, python3 with torch. It writes under $OUT (default: gpu-results/):
#   tests.txt         the test binary's output (GPU cases: 400 random shapes per dtype + edges)
#   vera-cuda.json    vera bench --device cuda --json, one object per case
#   torch-cuda.json   benches/peers/torch_vera.py --device cuda, same keys
#   comparison.json   per case: both times, PyTorch / vera, decode bandwidth share
#   summary.txt       the table of the above
# and exits non-zero if a test fails. Budgeted to finish in well under 5 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle

case "${1:-}" in
build)
    cargo build --release --features cuda --bin vera
    mkdir -p "${bundle}"
    cp target/release/vera "${bundle}/vera"
    # The integration test binary of tests/cuda_forward.rs, found through cargo's JSON messages.
    test_bin="$(cargo test --release --features cuda,cuda-emulation --test cuda_forward --no-run --message-format=json \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_forward":
        print(m["executable"])')"
    cp "${test_bin}" "${bundle}/cuda_forward"
    # Debug info is most of their size; the bundle travels.
    strip --strip-debug "${bundle}/vera" "${bundle}/cuda_forward" 2>/dev/null || true
    echo "gpu-check: binaries in ${bundle}/ (vera, cuda_forward)"
    ;;
run)
    out="${OUT:-gpu-results}"
    mkdir -p "${out}"
    [ -x "${bundle}/vera" ] && [ -x "${bundle}/cuda_forward" ] || {
        echo "gpu-check: ${bundle}/ is missing: run 'bash scripts/gpu-check.sh build' first and carry it" >&2
        exit 2
    }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "${out}/gpu.txt" 2>&1 || true
    status=0
    echo "== GPU tests against the f64 reference"
    VERA_KERNELS_EXPECT_GPU=1 timeout 150 "${bundle}/cuda_forward" --test-threads 1 2>&1 | tee "${out}/tests.txt" || status=1
    echo "== vera bench --device cuda"
    timeout 60 "${bundle}/vera" bench --device cuda --peak --json --budget-ms 200 \
        > "${out}/vera-cuda.json" 2> "${out}/vera-cuda.stderr" || status=1
    cat "${out}/vera-cuda.stderr"
    echo "== PyTorch (PEFT's formula) on the same suite"
    timeout 90 python3 benches/peers/torch_vera.py --device cuda --budget-ms 200 > "${out}/torch-cuda.json" || status=1
    python3 scripts/compare-bench.py "${out}/vera-cuda.json" "${out}/torch-cuda.json" \
        --peak-line "$(cat "${out}/vera-cuda.stderr")" --json "${out}/comparison.json" | tee "${out}/summary.txt"
    exit "${status}"
    ;;
*)
    echo "usage: bash scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
