#!/usr/bin/env bash
# Every check only a GPU can make, in one run on one H100 / H200. Once installed, the default parts' time limits sum
# to 8 minutes (VELOTUNE_SUITE_SCALE=1.5 gives each 50% more); a part that fails or runs out of time does not stop
# the others.
#   kernel-shapes  every Triton kernel vs PyTorch, compiled on the GPU at Llama-3.1-8B / Mixtral shapes, bf16 and
#                  fp16 (python -m velotune.bench.gpu_kernels): RMSNorm, RoPE, SwiGLU/GeGLU, the fused linear
#                  cross-entropy (sum, per row, soft-capped), the MoE grouped matmul, NF4 dequantization; errors
#                  against float64, fwd+bwd time and peak memory
#   lora-8b        8B-shaped QLoRA and LoRA, 2 x 2048: velotune vs transformers + peft (+ Liger when installed)
#   long-context   the longest 8B QLoRA sequence within 80 GB (velotune with checkpointing; up to 64k tokens)
#   full-mfu       full fine-tuning of the 1B shape: tokens/s, memory and MFU vs transformers
#   loop           (only when named) the transformers-style loop benchmark on the GPU
#   vision         (only when named) LLaVA LoRA vs transformers + peft (velotune bench --vision), bf16
#   moe            (only when named) Qwen3-MoE / Mixtral LoRA (attention; attention + experts) vs transformers + peft
#   kernel-tests   (only when named) pytest tests/test_kernels_*.py: those tests run the kernels in Triton's CPU
#                  interpreter (tiny shapes), so on a GPU machine they only check that Triton version's interpreter
# Results: benchmarks/results/gpu-suite/<part>/ (JSON + markdown with device, versions, command), <part>.log,
# summary.md (device, versions, this command, each part's status and time).
#
#   bash benchmarks/gpu_suite.sh                      # every part but loop
#   bash benchmarks/gpu_suite.sh lora-8b full-mfu     # the parts named
#   bash benchmarks/gpu_suite.sh --quick              # on the CPU, tiny shapes: checks this script (no install)
#
# Installation (skipped with --quick or VELOTUNE_SUITE_SKIP_INSTALL=1):
# - offline, when the checkout holds wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them on a machine that
#   reaches PyPI) or VELOTUNE_SUITE_OFFLINE=1: $PYTHON (default python3) must already hold a CUDA build of torch,
#   triton, transformers and peft; the wheels (bitsandbytes, liger-kernel) go into a folder on PYTHONPATH with
#   --no-index, and pip never touches the network (no retries eating the GPU's time).
# - else a venv at $VELOTUNE_GPU_VENV (default ~/.cache/velotune-gpu-venv) that sees $PYTHON's packages; when no
#   CUDA build of torch is importable, torch (VELOTUNE_TORCH, default 2.13.0, else the newest) and triton are
#   installed there; then velotune's test extras with that torch pinned, and liger-kernel if it installs.
# What was used is printed. VELOTUNE_SUITE_ARCHIVE=FILE.tgz also packs the results folder into one file at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
COMMAND="bash benchmarks/gpu_suite.sh $*"
QUICK=0
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    kernel-tests|kernel-shapes|lora-8b|long-context|full-mfu|loop|vision|moe) PARTS+=("$arg") ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (parts: kernel-tests kernel-shapes lora-8b long-context" \
            "full-mfu loop vision moe; or --quick)" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(kernel-shapes lora-8b long-context full-mfu)
[ "$QUICK" = 1 ] && [ $# -le 1 ] && PARTS+=(kernel-tests loop)

RESULTS="$ROOT/benchmarks/results/gpu-suite"
[ "$QUICK" = 1 ] && RESULTS="${VELOTUNE_SUITE_OUT:-$ROOT/benchmarks/results/gpu-suite-quick}"
mkdir -p "$RESULTS"
ROWS="$RESULTS/.parts.md"
: > "$ROWS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's velotune, whether installed or not
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

log() { echo "[gpu-suite $(date +%H:%M:%S)] $*" | tee -a "$RESULTS/suite.log"; }

# ---- installation ----------------------------------------------------------------------------------------------

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3 python; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then echo "$candidate"; return 0; fi
  done
  return 1
}

has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

pip_install() {  # quiet, its last lines shown on failure
  local out; out=$(mktemp)
  if "$PY" -m pip install -q --disable-pip-version-check "$@" >"$out" 2>&1; then rm -f "$out"; return 0; fi
  tail -n 8 "$out"; rm -f "$out"; return 1
}

install_offline() {  # the wheels carried in .whl/, without an index; what they need must be there already
  local site="${VELOTUNE_SUITE_SITE:-/tmp/velotune-suite-site}" wheels=("$ROOT"/.whl/*.whl)
  log "offline: $PY as it is$([ -e "${wheels[0]}" ] && echo ", plus ${#wheels[@]} wheel(s) from .whl/ in $site")"
  if [ -e "${wheels[0]}" ]; then
    mkdir -p "$site"
    if PIP_NO_INDEX=1 pip_install --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"; then
      export PYTHONPATH="$PYTHONPATH:$site"   # after the checkout: our velotune first, the image's packages kept
    else
      log "installing the carried wheels failed"
    fi
  fi
  has_cuda_torch "$PY" || log "WARNING: torch from $PY does not see a CUDA device"
}

install() {
  local base venv torch_version
  base=$(find_python) || { log "no python found (set PYTHON)"; exit 1; }
  PY="$base"
  if [ "$QUICK" = 1 ] || [ "${VELOTUNE_SUITE_SKIP_INSTALL:-0}" = 1 ]; then return 0; fi
  if [ "${VELOTUNE_SUITE_OFFLINE:-0}" = 1 ] || compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    install_offline; return 0
  fi
  venv="${VELOTUNE_GPU_VENV:-$HOME/.cache/velotune-gpu-venv}"
  if [ -x "$venv/bin/python" ] || "$base" -m venv --system-site-packages "$venv" >/dev/null 2>&1; then
    PY="$venv/bin/python"
  else
    log "could not make a venv with $base (python3-venv missing?): installing into $base itself"
    export PIP_BREAK_SYSTEM_PACKAGES=1
  fi
  if has_cuda_torch "$PY"; then
    log "using the CUDA build of torch already importable from $PY"
  else
    log "no CUDA build of torch importable from $PY: installing torch and triton"
    pip_install "torch==${VELOTUNE_TORCH:-2.13.0}" triton || pip_install torch triton \
      || log "installing torch failed"
    has_cuda_torch "$PY" || log "WARNING: torch still does not see a CUDA device"
  fi
  torch_version=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null) || { log "torch is missing"; exit 1; }
  echo "torch==$torch_version" > "$RESULTS/.constraints.txt"
  pip_install -c "$RESULTS/.constraints.txt" -e "$ROOT[test]" || log "installing velotune's test extras failed"
  pip_install -c "$RESULTS/.constraints.txt" liger-kernel || log "liger-kernel did not install: Liger skipped"
}

report_environment() {
  "$PY" - <<'EOF' 2>&1 | tee -a "$RESULTS/suite.log"
import platform, sys
from importlib import metadata
print("python", sys.executable, platform.python_version())
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
          torch.cuda.get_device_name() if cuda else "none (CPU only)")
except Exception as exc:
    print("torch not importable:", exc)
for name in ("triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "pytest"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
EOF
}

# ---- the parts ---------------------------------------------------------------------------------------------------

limit() { "$PY" -c "import sys; print(int(float(sys.argv[1]) * float(sys.argv[2])))" "$1" "${VELOTUNE_SUITE_SCALE:-1}"; }

run_part() {  # name seconds command... ; timeout signals the whole process group: the workers stop too
  local name=$1 seconds; seconds=$(limit "$2"); shift 2
  local wanted=0 p
  for p in "${PARTS[@]}"; do [ "$p" = "$name" ] && wanted=1; done
  [ "$wanted" = 1 ] || return 0
  local logfile="$RESULTS/$name.log" start status rc took
  start=$(date +%s)
  log "part $name (limit ${seconds} s): $*"
  timeout -k 20 "$seconds" "$@" >"$logfile" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  case $rc in 0) status=ok ;; 124|137) status="timed out" ;; *) status="failed (exit $rc)" ;; esac
  log "part $name: $status in ${took} s (log: $logfile)"
  tail -n 4 "$logfile" | sed 's/^/    /'
  echo "| $name | $status | $took / $seconds | \`$*\` |" >> "$ROWS"
}

liger_systems() {
  "$PY" -c "import liger_kernel" >/dev/null 2>&1 && echo ",liger-gc"
}

write_summary() {
  {
    echo "# GPU suite"
    echo
    echo "Command: \`$COMMAND\`  "
    echo "Date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo
    echo '```'
    report_environment
    echo '```'
    echo
    echo "| part | status | seconds / limit | command |"
    echo "|---|---|---|---|"
    cat "$ROWS"
    echo
    echo "Result files: $(cd "$RESULTS" && find . -name '*.md' ! -name summary.md ! -name '.*' | sort | tr '\n' ' ')"
  } > "$RESULTS/summary.md"
  rm -f "$ROWS"
}

finish() {  # the summary, and the results packed into one file when asked (a device tool returns few files)
  write_summary
  log "done: $RESULTS/summary.md"
  if [ -n "${VELOTUNE_SUITE_ARCHIVE:-}" ]; then
    tar czf "$VELOTUNE_SUITE_ARCHIVE" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" \
      && echo "[gpu-suite] packed: $VELOTUNE_SUITE_ARCHIVE"
  fi
}

install
log "suite: ${PARTS[*]} (quick: $QUICK); results in $RESULTS"
report_environment >/dev/null
if [ "$QUICK" = 0 ] && ! has_cuda_torch "$PY"; then
  log "no CUDA device visible to torch from $PY: the GPU parts cannot run"; finish; exit 1
fi

if [ "$QUICK" = 1 ]; then
  run_part kernel-tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_rmsnorm_torch.py
  run_part kernel-shapes 120 "$PY" -m velotune.bench.gpu_kernels --device cpu --quick --out "$RESULTS/kernel-shapes"
  run_part lora-8b 300 "$PY" benchmarks/train_bench.py --quick --cases qlora,lora --systems velotune,hf \
    --out "$RESULTS/lora-8b"
  run_part long-context 300 "$PY" benchmarks/train_bench.py --quick --cases lora --systems velotune-gc --steps 1 \
    --warmup 0 --max-seq-search --seq-limit 256 --out "$RESULTS/long-context"
  run_part full-mfu 300 "$PY" benchmarks/train_bench.py --quick --cases full --systems velotune,hf \
    --out "$RESULTS/full-mfu"
  run_part loop 300 "$PY" benchmarks/loop_bench.py --quick --out "$RESULTS/loop"
  run_part vision 300 "$PY" benchmarks/vision_bench.py --quick --out "$RESULTS/vision"
  run_part moe 300 "$PY" benchmarks/moe_bench.py --quick --methods lora --out "$RESULTS/moe"
else
  # The kernel tests interpret (tests/conftest.py sets TRITON_INTERPRET=1): here they check this Triton's
  # interpreter only; kernel-shapes is the compiled check.
  run_part kernel-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cross_entropy.py \
    tests/test_kernels_lora.py tests/test_kernels_nf4.py tests/test_kernels_rmsnorm_torch.py \
    tests/test_kernels_triton.py tests/test_kernels_grouped_mm.py
  run_part kernel-shapes 120 "$PY" -m velotune.bench.gpu_kernels --device cuda --out "$RESULTS/kernel-shapes"
  run_part lora-8b 190 "$PY" benchmarks/train_bench.py --device cuda --cases qlora,lora \
    --systems "velotune,hf,hf-gc$(liger_systems)" --reps 1 --warmup 1 --steps 3 --timeout 90 \
    --out "$RESULTS/lora-8b"
  run_part long-context 100 "$PY" benchmarks/train_bench.py --device cuda --cases qlora-long --systems velotune-gc \
    --reps 1 --warmup 0 --steps 1 --max-seq-search --memory-budget-mb 81920 --seq-grain 16384 --seq-limit 65536 \
    --timeout 60 --out "$RESULTS/long-context"
  run_part full-mfu 60 "$PY" benchmarks/train_bench.py --device cuda --cases full --systems velotune,hf --reps 1 \
    --warmup 2 --steps 5 --timeout 45 --out "$RESULTS/full-mfu"
  run_part loop 90 "$PY" benchmarks/loop_bench.py --device cuda --reps 1 --timeout 60 --out "$RESULTS/loop"
  run_part vision 150 "$PY" benchmarks/vision_bench.py --device cuda --reps 1 --timeout 60 --out "$RESULTS/vision"
  run_part moe 200 "$PY" benchmarks/moe_bench.py --device cuda --methods lora,experts --reps 1 --timeout 60 \
    --out "$RESULTS/moe"
fi
finish
