#!/usr/bin/env bash
# Fetches, into .whl/ at the checkout's root, the wheels the GPU suite needs beyond what a machine with a CUDA
# build of torch, triton, transformers and peft already holds: bitsandbytes (QLoRA, NF4 checks) and liger-kernel
# (the Liger baseline). Run it where PyPI is reachable; then carry .whl/ (git ignores it) to a GPU machine that
# has no network: benchmarks/gpu_suite.sh installs them from there without an index.
#
#   bash benchmarks/gpu_wheels.sh                 # for CPython 3.12 on x86-64 Linux
#   GPU_PYTHON_VERSION=3.11 bash benchmarks/gpu_wheels.sh
#
# Pure-Python or manylinux wheels only (--only-binary), no dependencies (--no-deps): their needs (torch, numpy,
# packaging, triton) are on the GPU machine already. About 45 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${GPU_PYTHON_VERSION:-3.12}"
PY="${PYTHON:-python3}"
mkdir -p .whl
# bitsandbytes at the version the CPU results were measured with; Liger at its newest.
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "bitsandbytes==${VELOTUNE_BNB:-0.50.2}" liger-kernel
ls -l .whl
