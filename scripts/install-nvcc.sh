#!/usr/bin/env bash
# Installs a CUDA 13.0 nvcc (with ptxas, the CUDA headers and libdevice) on a machine without a GPU,
# from the Python package index, for building vera-kernels with `--features cuda`.
#
# Pinned to CUDA 13.0 on purpose: the GPU machines this crate is checked on run driver 580
# (CUDA 13.0), which cannot load PTX from a newer toolkit.
#
#   bash scripts/install-nvcc.sh [PREFIX]     # default PREFIX: ~/.cache/vera-kernels/cuda-13.0
#
# Prints the nvcc path on its last line; build.rs also finds nvcc at the default prefix by itself
# (or set NVCC to that path).
set -euo pipefail

prefix="${1:-${HOME}/.cache/vera-kernels/cuda-13.0}"
nvcc="${prefix}/nvidia/cu13/bin/nvcc"
packages=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-nvvm==13.0.88
)

# grep without -q reads its whole input: under pipefail, a grep that stops at the first match could
# fail the pipe with SIGPIPE (exit 141) while nvcc still writes.
if [ -x "${nvcc}" ] && "${nvcc}" --version | grep "release 13.0," >/dev/null; then
    echo "install-nvcc: CUDA 13.0 nvcc already at ${prefix}" >&2
else
    python="$(command -v python3 || command -v python || true)"
    if [ -z "${python}" ]; then
        echo "install-nvcc: needs python3 with pip" >&2
        exit 1
    fi
    mkdir -p "${prefix}"
    "${python}" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --upgrade --target "${prefix}" "${packages[@]}"
fi

# The wheels put nvvm (cicc, libdevice) beside bin/, where nvcc looks for it; check that nvcc runs.
"${nvcc}" --version | grep "release 13.0," >/dev/null || {
    echo "install-nvcc: ${nvcc} is not a working CUDA 13.0 nvcc" >&2
    exit 1
}
echo "${nvcc}"
