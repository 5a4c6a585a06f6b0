#!/usr/bin/env bash
# Everything the first GPU run should bring back, in one time-boxed script. Two halves, because
# the GPU machine has no Rust toolchain and no network:
#
#   bash scripts/gpu-check.sh build   # here: the test binaries, `vera` and the kernels' fatbin,
#                                     # stripped, into target/gpu-bundle/; prints what to carry
#   bash scripts/gpu-check.sh run     # there, from the repository root (target/gpu-bundle/
#                                     # carried), with OUT set to the folder that comes back
#
# `run` is boxed to TIME_BOX_S (240 s) in all, so that a second run still fits in one lease. In order,
# each step bounded by `timeout` and by what is left of the box (a step that no longer fits is
# skipped with one line, as is a tool that is not installed):
#   1. preflight: nvidia-smi (clocks too), ldd of the binaries, where libcuda is found;
#   2. the GPU tests, on the GPU only (VERA_KERNELS_SKIP_EMULATION=1) and required to find it
#      (VERA_KERNELS_EXPECT_GPU=1), each test in its own process with CUDA_LAUNCH_BLOCKING=1 (not
#      the tests of asynchronous work) and a small proptest shrink budget: tests/cuda_forward.rs,
#      tests/cuda_mixed.rs (mixed-adapter batches), tests/cuda_backward.rs (the training backward)
#      and tests/cuda_gpu_scale.rs (model sizes, 500 back-to-back calls, two threads/streams); the
#      16-bit tile edge tests again on the 128 x 128 prefill tiles (VERA_CUDA_PREFILL_TILE=128);
#   3. ours and PyTorch's PEFT path timed the same way (CUDA events around each call, median):
#      the `vera bench` suite with L2 warm, then the decode shapes with A and B out of L2, then a
#      bf16 training step (`--backward`) against PyTorch autograd; the decode shapes with and without
#      programmatic dependent launch (VERA_CUDA_PROGRAMMATIC_LAUNCH=0), and with their split sums
#      in the up- and in the down-projection (VERA_CUDA_DECODE_SPLIT_SUM); T = 4096 prefill shapes on
#      the automatic tiles (128 x 128 where a product has a wave of them) and on 64 x 64
#      (VERA_CUDA_PREFILL_TILE=64);
#   4. cuobjdump -sass -res-usage on the carried fatbin (registers, spills, instruction mix);
#   5. compute-sanitizer memcheck, racecheck and synccheck on the tile and split edge tests (forward
#      and backward);
#   6. ncu on the decode shapes (T = 1 and 8, n = m = 4096, r = 256 and 1024, bf16): DRAM
#      throughput, shared-memory bank conflicts, tensor-pipe use.
# GPU_CHECK_STEPS="tests bench sass sanitizers ncu" (the default: all) picks steps for a rerun,
# and GPU_CHECK_TESTS (an extended regex over test names) picks tests; the preflight always runs.
# It writes three files under $OUT (default gpu-results/): summary.txt (the short tables),
# log.txt (everything printed) and results.tgz (every step's own output). It exits non-zero when a
# test fails, a sanitizer reports an error or the benchmarks fail. Without a GPU it stops at once
# with one line.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly BUNDLE=target/gpu-bundle
readonly FEATURES=cuda,cuda-emulation
readonly TEST_BINARIES=(cuda_forward cuda_mixed cuda_backward cuda_gpu_scale)
# The whole run; the steps get STEPS_S of it, packing the results the rest.
readonly TIME_BOX_S=240
readonly STEPS_S=225
# Tests of asynchronous work, which CUDA_LAUNCH_BLOCKING=1 would make synchronous.
readonly ASYNC_TESTS='back_to_back|two_threads'
# The decode shapes of the L2-cold timings and of the profiles.
readonly DECODE_SHAPES=("1,4096,4096,256" "1,4096,4096,1024" "8,4096,4096,256" "8,4096,4096,1024")

die() {
    echo "gpu-check: $*" >&2
    exit 2
}

# --- build (here) -------------------------------------------------------------------------------

# The executables (and build-script out dirs) named in cargo's JSON messages on stdin, as
# "executable <target name> <path>" and "out_dir <path>" lines.
cargo_artifacts() {
    python3 -c '
import json, re, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print("executable", m["target"]["name"], m["executable"])
    # This package (ids read "path+file:///...#vera-kernels@0.1.0", or "vera-kernels 0.1.0 (...)").
    elif m.get("reason") == "build-script-executed" and re.search(r"(^|#)vera-kernels[@ ]", m.get("package_id", "")):
        print("out_dir", m["out_dir"])
'
}

# Path of the one artifact line `kind name` in $1's lines.
artifact() {
    awk -v kind="$2" -v name="$3" '$1 == kind && (kind == "out_dir" || $2 == name) { print $NF }' <<<"$1" | tail -n 1
}

build() {
    command -v cargo >/dev/null || die "build needs cargo (a Rust toolchain)"
    local artifacts name tests=()
    for name in "${TEST_BINARIES[@]}"; do tests+=(--test "${name}"); done
    artifacts="$(
        cargo build --release --features "${FEATURES}" --bin vera --message-format=json | cargo_artifacts
        cargo test --release --features "${FEATURES}" --no-run --message-format=json "${tests[@]}" | cargo_artifacts
    )"
    rm -rf "${BUNDLE}"
    mkdir -p "${BUNDLE}"
    local path
    for name in vera "${TEST_BINARIES[@]}"; do
        path="$(artifact "${artifacts}" executable "${name}")"
        [ -x "${path}" ] || die "cargo did not report the ${name} binary"
        cp "${path}" "${BUNDLE}/${name}"
        # Debug info is most of their size, and the bundle travels; symbols stay for backtraces.
        strip --strip-debug "${BUNDLE}/${name}"
    done
    # The kernels as the binaries embed them (build.rs: OUT_DIR/vera_kernels.fatbin), for
    # cuobjdump on the GPU machine, which has one (this one may not).
    path="$(artifact "${artifacts}" out_dir -)/vera_kernels.fatbin"
    [ -f "${path}" ] || die "no fatbin at ${path} (build.rs writes it with feature cuda)"
    cp "${path}" "${BUNDLE}/vera_kernels.fatbin"
    write_manifest >"${BUNDLE}/MANIFEST.txt"
    echo "gpu-check: bundle in ${BUNDLE}/ ($(du -sh "${BUNDLE}" | cut -f1)):"
    find "${BUNDLE}" -maxdepth 1 -type f -printf '%f %s\n' | sort | awk '{ printf "  %-22s %6.1f MiB\n", $1, $2 / 1048576 }'
    echo "gpu-check: carry ${BUNDLE} (ignored by git, so name it), then on the GPU machine:"
    echo "  bash scripts/gpu-check.sh run     # with OUT set; about 4 minutes"
}

# What the bundle was built from.
write_manifest() {
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version 2>/dev/null | sed -n 1p)"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "nvcc: $("${NVCC:-nvcc}" --version 2>/dev/null | tail -n 1 || echo unknown)"
    echo "features: ${FEATURES}"
    (cd "${BUNDLE}" && sha256sum -- vera "${TEST_BINARIES[@]}" vera_kernels.fatbin)
}

# --- run (on the GPU machine) --------------------------------------------------------------------

# One line and a non-zero exit when this machine cannot run the check.
require_gpu_and_bundle() {
    if ! command -v nvidia-smi >/dev/null; then
        die "no NVIDIA GPU here (nvidia-smi not found): 'run' is for the GPU machine; here, 'build' makes ${BUNDLE}/ to carry there"
    fi
    # Read whole, not piped into grep -q: under pipefail an early exit of grep would fail the pipe.
    local gpus
    gpus="$(nvidia-smi -L 2>/dev/null || true)"
    if ! grep -q '^GPU ' <<<"${gpus}"; then
        die "nvidia-smi lists no GPU: 'run' needs one (is the driver loaded?)"
    fi
    local name
    for name in vera "${TEST_BINARIES[@]}" vera_kernels.fatbin; do
        [ -f "${BUNDLE}/${name}" ] || die "${BUNDLE}/${name} is missing: run 'bash scripts/gpu-check.sh build' where cargo is, and carry ${BUNDLE}"
    done
}

run() {
    require_gpu_and_bundle
    local out="${OUT:-gpu-results}" work status=0
    mkdir -p "${out}"
    out="$(cd "${out}" && pwd)"
    work="$(mktemp -d)"
    # The steps, boxed: whatever they finished is packed below even when the box closes on them.
    timeout -k 5 "${STEPS_S}" bash "$0" _steps "${work}" 2>&1 | tee "${out}/log.txt" || status=$?
    if [ "${status}" -eq 124 ] || [ "${status}" -eq 137 ]; then
        echo "TIME BOX: the steps ran past ${STEPS_S} s and were stopped; the results hold what finished" \
            | tee -a "${out}/log.txt" >>"${work}/summary.txt"
    fi
    cp "${work}/summary.txt" "${out}/summary.txt" 2>/dev/null || echo "no summary: the steps did not start" >"${out}/summary.txt"
    echo "exit status: ${status}" >>"${out}/summary.txt"
    tar -czf "${out}/results.tgz" -C "${work}" --exclude=./summary.txt .
    # A file that comes back may hold at most 16 MiB: past that, leave out the largest parts.
    if [ "$(stat -c %s "${out}/results.tgz")" -gt $((15 << 20)) ]; then
        tar -czf "${out}/results.tgz" -C "${work}" --exclude=./summary.txt --exclude='*.ncu-rep' --exclude=./sass.txt .
        echo "results.tgz: over 15 MiB, packed again without ncu/*.ncu-rep and sass.txt" | tee -a "${out}/summary.txt"
    fi
    rm -rf "${work}"
    echo "== summary (also ${out}/summary.txt; log.txt and results.tgz beside it)"
    cat "${out}/summary.txt"
    return "${status}"
}

# --- the steps, run by `run` under the time box ---------------------------------------------------

# Seconds left in the steps' box (run started them STEPS_S seconds before it stops them).
remaining() {
    echo $((STEPS_S - SECONDS - 3))
}

# The timeout for a step that wants $1 seconds: what is left if less; 0 (skip) when under $2 (the
# least the step can use, default 10).
step_timeout() {
    local want="$1" least="${2:-10}" left
    left="$(remaining)"
    if [ "${left}" -lt "${least}" ]; then
        echo 0
    elif [ "${left}" -lt "${want}" ]; then
        echo "${left}"
    else
        echo "${want}"
    fi
}

# Appends a line to the summary and prints it.
note() {
    echo "$*" | tee -a "${WORK}/summary.txt"
}

# Prints a step's header into the log.
header() {
    echo
    echo "== [$(printf '%3d' "${SECONDS}") s] $*"
}

# Whether tool $1 is installed; otherwise one line saying the step that needs it is skipped.
have_tool() {
    command -v "$1" >/dev/null && return 0
    note "skipped $2: $1 is not installed"
    return 1
}

preflight() {
    header "preflight"
    chmod +x "${BUNDLE}/vera" "${BUNDLE}"/cuda_*
    cat "${BUNDLE}/MANIFEST.txt"
    nvidia-smi || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw \
        --format=csv | tee "${WORK}/gpu.csv" || true
    nvidia-smi -q -d CLOCK,PERFORMANCE >"${WORK}/nvidia-smi-clocks.txt" 2>&1 || true
    echo "-- ldd (the binaries load libcuda at run time, so it is not listed here)"
    ldd --version | sed -n 1p
    ldd "${BUNDLE}/vera" || true
    echo "-- libcuda: ldconfig, then LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so' || echo "libcuda is not in the ldconfig cache"
    local dir library_path="${LD_LIBRARY_PATH:-}"
    for dir in ${library_path//:/ } /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do
        ls "${dir}"/libcuda.so* 2>/dev/null || true
    done
    echo "-- tools"
    local tool
    for tool in compute-sanitizer ncu cuobjdump python3; do
        echo "${tool}: $(command -v "${tool}" || echo 'not installed')"
    done
    # Built on another machine: if the system libraries here are too old, say so in the summary.
    "${BUNDLE}/vera" --version || note "the bundled vera does not start here ($("${BUNDLE}/vera" --version 2>&1 | sed -n 1p))"
    uname -a
    nproc
    note "GPU: $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader 2>/dev/null | sed -n 1p) (name, driver, SM MHz now/max, memory MHz)"
    note "bundle: $(head -n 1 "${BUNDLE}/MANIFEST.txt")"
}

# Runs test $2 of binary $1 alone, as the GPU check needs it, within $3 seconds, with the
# environment assignments that follow (if any); records the result. Returns 0 when it passed, 2
# when the time box left no room for it, 1 otherwise.
run_one_test() {
    local bin="$1" name="$2" limit="$3" log blocking=1 started result label="$2" suffix=""
    shift 3
    local -a extra=("$@")
    if [ "${#extra[@]}" -gt 0 ]; then
        label="${name} ${extra[*]}"
        suffix=".$(printf '%s' "${extra[*]}" | tr -c 'A-Za-z0-9' _)"
    fi
    log="${WORK}/tests/${bin}.${name}${suffix}.txt"
    [[ "${name}" =~ ${ASYNC_TESTS} ]] && blocking=0
    started="${SECONDS}"
    local t
    t="$(step_timeout "${limit}" 5)"
    if [ "${t}" -eq 0 ]; then
        result="SKIPPED (time box)"
    else
        local -a env=(VERA_KERNELS_EXPECT_GPU=1 VERA_KERNELS_SKIP_EMULATION=1 PROPTEST_MAX_SHRINK_ITERS=64 PROPTEST_MAX_SHRINK_TIME=20000 RUST_BACKTRACE=1 "${extra[@]}")
        [ "${blocking}" -eq 1 ] && env+=(CUDA_LAUNCH_BLOCKING=1)
        if timeout -k 5 "${t}" env "${env[@]}" "${BUNDLE}/${bin}" --exact "${name}" --nocapture --test-threads 1 >"${log}" 2>&1; then
            # One test ran and passed: not filtered out, not ignored, not skipped for want of a GPU.
            if ! grep -q "test result: ok. 1 passed" "${log}"; then
                result="FAILED (did not run)"
            elif grep -q "skipped: .* need a GPU" "${log}"; then
                result="FAILED (skipped: no GPU)"
            else
                result=ok
            fi
        else
            local rc=$?
            if [ "${rc}" -eq 124 ] || [ "${rc}" -eq 137 ]; then result="FAILED (timeout ${t} s)"; else result="FAILED (exit ${rc})"; fi
        fi
        # The model-sized tests' error ratios; for a failure, where and why it panicked.
        grep -A 1 -E "max \|error\| / bound|panicked|skipped:" "${log}" | grep -v '^--$' | sed -n 's/^/    /; 1,16p' || true
    fi
    printf '  %-9s %-54s %-24s %4d s\n' "${bin#cuda_}" "${label}" "${result}" $((SECONDS - started)) | tee -a "${WORK}/summary.txt"
    case "${result}" in
    ok) return 0 ;;
    SKIPPED*) return 2 ;;
    *) return 1 ;;
    esac
}

gpu_tests() {
    header "GPU tests, one process each, on the GPU only"
    mkdir -p "${WORK}/tests"
    note "tests (GPU only, one process each):"
    local bin name failed=0 passed=0 skipped=0 rc
    for bin in "${TEST_BINARIES[@]}"; do
        local names
        names="$("${BUNDLE}/${bin}" --list 2>/dev/null | sed -n 's/: test$//p' | grep -E "${GPU_CHECK_TESTS:-.}" || true)"
        if [ -z "${names}" ]; then
            # A binary that lists nothing did not run (or is not a test binary); a filter may
            # leave one out on purpose.
            if [ -z "${GPU_CHECK_TESTS:-}" ]; then
                note "  ${bin}: --list found no tests"
                failed=$((failed + 1))
            fi
            continue
        fi
        # Each test once, then the 16-bit edge tests again on the 128 x 128 prefill tiles, which
        # the plans choose on their own only at model sizes (tests/cuda_gpu_scale.rs): one line
        # per run, the test's name and the environment it adds.
        local runs extra
        runs="${names}$(grep -E 'tile_and_split_edges_(f16|bf16)$' <<<"${names}" | sed 's/$/ VERA_CUDA_PREFILL_TILE=128/; 1s/^/\n/' || true)"
        while read -r name extra; do
            # The model-sized tests do real work on the host too (the f64 reference).
            local limit=60
            [ "${bin}" = cuda_gpu_scale ] && limit=90
            rc=0
            run_one_test "${bin}" "${name}" "${limit}" ${extra:+"${extra}"} || rc=$?
            case "${rc}" in
            0) passed=$((passed + 1)) ;;
            2) skipped=$((skipped + 1)) ;;
            *) failed=$((failed + 1)) ;;
            esac
        done <<<"${runs}"
    done
    note "  ${passed} passed, ${failed} failed, ${skipped} not run (time box)"
    # A test the box left out is not a pass, nor is a run that tested nothing.
    [ "${failed}" -eq 0 ] && [ "${skipped}" -eq 0 ] && [ "${passed}" -gt 0 ]
}

# Times ours and PyTorch's PEFT path on the same cases: $1 names the variant, $2 and $3 bound
# each side in seconds, $4 says whether python3 has torch with CUDA, the rest are the arguments
# both take. `vera` also measures the copy bandwidth (--peak), the decode roofline of the table.
bench_pair() {
    local variant="$1" vera_s="$2" torch_s="$3" torch_ok="$4"
    shift 4
    local t status=0 dir="${WORK}/bench" key=fused_ms
    # The training variant compares whole steps (forward, then backward).
    [ "${variant}" = train ] && key=train_step_ms
    t="$(step_timeout "${vera_s}" 15)"
    if [ "${t}" -eq 0 ]; then
        note "skipped the ${variant} timings: time box"
        return 0
    fi
    timeout -k 5 "${t}" "${BUNDLE}/vera" bench --device cuda --json --peak "$@" \
        >"${dir}/vera-${variant}.json" 2>"${dir}/vera-${variant}.stderr" || status=1
    cat "${dir}/vera-${variant}.stderr"
    touch "${dir}/torch-${variant}.json"
    if [ "${torch_ok}" != yes ]; then
        note "skipped PyTorch's ${variant} timings: python3 has no torch with CUDA"
    else
        t="$(step_timeout "${torch_s}" 15)"
        if [ "${t}" -eq 0 ]; then
            note "skipped PyTorch's ${variant} timings: time box"
        else
            timeout -k 5 "${t}" python3 benches/peers/torch_vera.py --device cuda "$@" \
                >"${dir}/torch-${variant}.json" 2>"${dir}/torch-${variant}.stderr" || status=1
            tail -n 5 "${dir}/torch-${variant}.stderr"
        fi
    fi
    note "timings, ${variant} (${key}; each call between CUDA events, median; torch/vera above 1: ours is faster):"
    python3 scripts/compare-bench.py "${dir}/vera-${variant}.json" "${dir}/torch-${variant}.json" --key "${key}" \
        --peak-line "$(cat "${dir}/vera-${variant}.stderr")" --json "${dir}/comparison-${variant}.json" \
        | sed 's/^/  /' | tee -a "${WORK}/summary.txt" || status=1
    [ "${status}" -eq 0 ] || note "  the ${variant} timings FAILED (see bench/*.stderr in results.tgz)"
    return "${status}"
}

# The same shapes timed two ways, set by an environment variable, alternated twice (L2 warm,
# fused_ms medians): $1 names the comparison, $2 the variable, $3 and $4 its two values (the
# default first), $5 bounds each run in seconds; the rest are `vera bench` arguments.
variant_pair() {
    local what="$1" var="$2" first="$3" second="$4" each="$5" t status=0 dir="${WORK}/bench" round value
    shift 5
    for round in 1 2; do
        for value in "${first}" "${second}"; do
            t="$(step_timeout "${each}" 8)"
            if [ "${t}" -eq 0 ]; then
                note "skipped the ${what} timings: time box"
                return 0
            fi
            env "${var}=${value}" timeout -k 5 "${t}" "${BUNDLE}/vera" bench --device cuda --json \
                --no-dense --budget-ms 50 "$@" >>"${dir}/vera-${var}-${value}.json" \
                2>>"${dir}/vera-${var}.stderr" || status=1
        done
    done
    note "timings, ${what}: ${var}=${first} against ${var}=${second} (fused_ms medians; ratio above 1: ${first} is faster):"
    python3 - "${dir}/vera-${var}-${first}.json" "${dir}/vera-${var}-${second}.json" "${first}" "${second}" <<'PY' | tee -a "${WORK}/summary.txt" || status=1
import json, statistics, sys
def load(path):
    runs = {}
    for line in open(path):
        if line.startswith("{"):
            j = json.loads(line)
            runs.setdefault((j["case"], j["dtype"]), []).append(j["fused_ms"])
    return runs
a_runs, b_runs = load(sys.argv[1]), load(sys.argv[2])
a_name, b_name = sys.argv[3], sys.argv[4]
for key in a_runs:
    if key in b_runs:
        a, b = statistics.median(a_runs[key]), statistics.median(b_runs[key])
        print(f"  {key[0]:28s} {key[1]:5s} {a_name} {a * 1e3:9.2f} us  {b_name} {b * 1e3:9.2f} us  ratio {b / a:5.2f}")
PY
    [ "${status}" -eq 0 ] || note "  the ${what} timings FAILED (see bench/vera-${var}.stderr)"
    return "${status}"
}

benchmarks() {
    header "timings: vera bench --device cuda and PyTorch's PEFT path, the same way"
    mkdir -p "${WORK}/bench"
    local status=0 shapes=() shape torch_ok=no
    for shape in "${DECODE_SHAPES[@]}"; do shapes+=(--shape "${shape}"); done
    python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null && torch_ok=yes
    bench_pair warm 45 60 "${torch_ok}" --budget-ms 100 || status=1
    # The decode shapes only: there A and B are most of the bytes a call moves.
    bench_pair cold 30 45 "${torch_ok}" --budget-ms 100 --no-dense --l2 cold "${shapes[@]}" || status=1
    # What the overlap of the decode's two launches buys (on sm_90 the up-projection is the
    # down-projection's programmatic dependent by default).
    variant_pair "decode with and without programmatic dependent launch" VERA_CUDA_PROGRAMMATIC_LAUNCH 1 0 10 \
        "${shapes[@]}" || status=1
    # Who sums the decode's split partials: each up-projection block, or the down-projection's
    # last block per group (the plan picks the first while the partials are few).
    variant_pair "decode split sums in the up-projection and in the down-projection" VERA_CUDA_DECODE_SPLIT_SUM up \
        down 10 --dtype bf16 "${shapes[@]}" || status=1
    # The large prefill tiles (chosen on their own for a product with a wave of them) against 64 x 64.
    variant_pair "prefill on the automatic tiles and on 64 x 64" VERA_CUDA_PREFILL_TILE auto 64 15 --dtype bf16 \
        --shape 4096,4096,4096,256 --shape 4096,4096,4096,1024 --shape 4096,4096,11008,256 || status=1
    # A training step (forward, then backward) against PyTorch autograd through PEFT's formula, bf16.
    bench_pair train 30 45 "${torch_ok}" --budget-ms 50 --no-dense --backward --dtype bf16 || status=1
    return "${status}"
}

# One line per kernel and architecture from the `cuobjdump -sass -res-usage` dump in $1: its
# resources (registers, stack, shared and local memory) and counts of the instructions that say
# whether the kernel runs as designed (HMMA: tensor cores; LDSM: ldmatrix; LDG.128: 16-byte
# loads to registers; LDGSTS: cp.async copies to shared memory; LDL/STL: local memory, which
# should not be there).
sass_table() {
    printf "  %-5s %-24s %4s %5s %6s %5s %4s %4s %7s %6s %7s\n" \
        arch kernel REG STACK SHARED LOCAL HMMA LDSM LDG.128 LDGSTS LDL/STL
    awk '
        function field(k, name) { return (k SUBSEP name) in res ? res[k, name] : "-" }
        /arch = sm_/ { arch = $NF }
        /^[ \t]*Function [^:]+:[ \t]*$/ { rf = $2; sub(/:$/, "", rf); next }
        /REG:[0-9]+/ && rf != "" {
            for (i = 1; i <= NF; i++) if (split($i, kv, ":") == 2) res[arch " " rf, kv[1]] = kv[2]
            kernels[arch " " rf] = 1; rf = ""; next
        }
        /Function : / { fn = $NF; kernels[arch " " fn] = 1; next }
        fn != "" && /HMMA/ { hmma[arch " " fn]++ }
        fn != "" && /LDSM/ { ldsm[arch " " fn]++ }
        fn != "" && /[ \t]LDG\.[A-Z0-9.]*128/ { ldg128[arch " " fn]++ }
        fn != "" && /LDGSTS/ { ldgsts[arch " " fn]++ }
        fn != "" && /[^A-Z](LDL|STL)[. ]/ { lmem[arch " " fn]++ }
        END {
            for (k in kernels) {
                split(k, name, " ")
                printf "  %-5s %-24s %4s %5s %6s %5s %4d %4d %7d %6d %7d\n", name[1], name[2], field(k, "REG"), field(k, "STACK"),
                    field(k, "SHARED"), field(k, "LOCAL"), hmma[k], ldsm[k], ldg128[k], ldgsts[k], lmem[k]
            }
        }' "$1" | sort
}

disassembly() {
    header "cuobjdump -sass -res-usage on the fatbin"
    have_tool cuobjdump "the SASS dump" || return 0
    local t
    t="$(step_timeout 30)"
    [ "${t}" -ne 0 ] || { note "skipped the SASS dump: time box"; return 0; }
    # Without nvdisasm the SASS is missing but the resource usage is there: table it anyway.
    timeout "${t}" cuobjdump -sass -res-usage "${BUNDLE}/vera_kernels.fatbin" >"${WORK}/sass.txt" 2>&1 \
        || note "cuobjdump failed: $(tail -n 1 "${WORK}/sass.txt")"
    sass_table "${WORK}/sass.txt" >"${WORK}/sass-table.txt"
    # The H200's architecture in the summary; every architecture in sass-table.txt.
    note "SASS per sm_90 kernel (resources, instruction counts; sass.txt and sass-table.txt in results.tgz):"
    grep -E "^  (arch|sm_90) " "${WORK}/sass-table.txt" | tee -a "${WORK}/summary.txt"
}

sanitizers() {
    header "compute-sanitizer on the tile and split edge tests"
    have_tool compute-sanitizer "the sanitizer runs" || return 0
    mkdir -p "${WORK}/sanitizer"
    note "compute-sanitizer (tile_and_split_edges_*, every dtype, forward and backward):"
    local tool bin t status=0 log rc
    for tool in memcheck racecheck synccheck; do
        for bin in cuda_forward cuda_backward; do
            t="$(step_timeout 30 20)"
            if [ "${t}" -eq 0 ]; then
                note "  ${tool} ${bin}: skipped (time box)"
                continue
            fi
            log="${WORK}/sanitizer/${tool}-${bin}.txt"
            rc=0
            timeout -k 5 "${t}" env VERA_KERNELS_EXPECT_GPU=1 VERA_KERNELS_SKIP_EMULATION=1 \
                compute-sanitizer --tool "${tool}" --error-exitcode 86 --print-limit 50 \
                "${BUNDLE}/${bin}" tile_and_split_edges --test-threads 1 >"${log}" 2>&1 || rc=$?
            local verdict
            case "${rc}" in
            0) verdict="clean" ;;
            86) verdict="ERRORS" ;;
            124 | 137) verdict="TIMEOUT after ${t} s" ;;
            *) verdict="FAILED (exit ${rc})" ;;
            esac
            [ "${rc}" -eq 0 ] || status=1
            note "  ${tool} ${bin}: ${verdict}; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "${log}" | tail -n 1 | sed 's/^=* *//'); $(grep -E '^test result' "${log}" | tail -n 1 | cut -d';' -f1-2)"
        done
    done
    return "${status}"
}

profiles() {
    header "ncu on the decode shapes (bf16)"
    have_tool ncu "the profiles" || return 0
    mkdir -p "${WORK}/ncu"
    note "ncu (bf16, one timed call's two kernels per shape; reports in results.tgz ncu/):"
    local shape t name
    # Sections for the report; the metrics are the headline numbers, by name (if this ncu does not
    # know one of them, the run is repeated with the sections alone).
    local -a sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables
        --section ComputeWorkloadAnalysis --section LaunchStats --section Occupancy)
    local metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
    metrics+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum
    metrics+=,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
    for shape in "${DECODE_SHAPES[@]}"; do
        name="t${shape//,/_}"
        t="$(step_timeout 40 15)"
        if [ "${t}" -eq 0 ]; then
            note "  ncu ${shape}: skipped (time box)"
            continue
        fi
        # Skips the warm-up calls' kernels (10 calls, 2 kernels each): profiles one timed call.
        local -a cmd=(ncu --clock-control none -k regex:vera_ --launch-skip 20 --launch-count 2 -f -o "${WORK}/ncu/${name}")
        local -a app=("${BUNDLE}/vera" bench --device cuda --dtype bf16 --shape "${shape}" --budget-ms 0 --json)
        if ! timeout -k 5 "${t}" "${cmd[@]}" "${sections[@]}" --metrics "${metrics}" "${app[@]}" >"${WORK}/ncu/${name}.log" 2>&1; then
            t="$(step_timeout 40 15)"
            if [ "${t}" -ne 0 ]; then
                timeout -k 5 "${t}" "${cmd[@]}" "${sections[@]}" "${app[@]}" >>"${WORK}/ncu/${name}.log" 2>&1 || true
            fi
        fi
        if [ -f "${WORK}/ncu/${name}.ncu-rep" ]; then
            ncu --import "${WORK}/ncu/${name}.ncu-rep" --page details >"${WORK}/ncu/${name}.txt" 2>&1 || true
            ncu --import "${WORK}/ncu/${name}.ncu-rep" --page raw --csv --print-units base >"${WORK}/ncu/${name}.csv" 2>&1 || true
            python3 scripts/ncu-summary.py "${shape}" "${WORK}/ncu/${name}.csv" | tee -a "${WORK}/summary.txt" || true
        else
            note "  ncu ${shape}: no report ($(grep -m 1 -E 'ERROR|error' "${WORK}/ncu/${name}.log" || tail -n 1 "${WORK}/ncu/${name}.log"))"
        fi
    done
}

# Whether GPU_CHECK_STEPS (default: every step) names step $1.
wanted() {
    [[ " ${GPU_CHECK_STEPS:-tests bench sass sanitizers ncu} " == *" $1 "* ]] && return 0
    note "skipped $1: not in GPU_CHECK_STEPS"
    return 1
}

# cudarc loads libcuda by name: when the loader's cache lacks it, put the driver's folder on the
# library path.
find_libcuda() {
    local dir cache
    cache="$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)"
    if grep -q 'libcuda\.so' <<<"${cache}"; then
        return 0
    fi
    for dir in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/local/cuda/compat; do
        if ls "${dir}"/libcuda.so* >/dev/null 2>&1; then
            export LD_LIBRARY_PATH="${dir}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
            note "libcuda is not in the loader's cache; found in ${dir}, put on LD_LIBRARY_PATH"
            return 0
        fi
    done
    note "libcuda not found (ldconfig, usual folders): the tests will report no GPU"
}

steps() {
    WORK="$1"
    SECONDS=0
    local status=0
    note "gpu-check run, $(date -u +%Y-%m-%dT%H:%M:%SZ), time box ${TIME_BOX_S} s"
    find_libcuda
    preflight
    if wanted tests; then gpu_tests || status=1; fi
    if wanted bench; then benchmarks || status=1; fi
    if wanted sass; then disassembly; fi
    if wanted sanitizers; then sanitizers || status=1; fi
    if wanted ncu; then profiles; fi
    note "steps done in ${SECONDS} s"
    return "${status}"
}

case "${1:-}" in
build) build ;;
run) run ;;
_steps) steps "$2" ;;
*)
    echo "usage: bash scripts/gpu-check.sh build|run   (see the comment at the top)" >&2
    exit 2
    ;;
esac
