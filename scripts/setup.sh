#!/usr/bin/env bash
# Creates .venv and installs velotune into it, torch first.
# Why torch first: a bare `torch` requirement on a machine without torch pulls the multi-GB CUDA build;
# installing the pinned CPU build first makes every later range resolve to it.
#   scripts/setup.sh          runtime + demo
#   scripts/setup.sh --test   also the test tools (peft, bitsandbytes, gguf, datasets, triton)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${VELOTUNE_TORCH:-2.13.0}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null \
  || python -m pip install -q "torch==$TORCH_VERSION"
constraints=$(mktemp); trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"
extras="quant,export,data"
if [ "${1:-}" = "--test" ]; then
  extras="test,quant,export,data,serve"
  # triton runs our kernels under TRITON_INTERPRET=1 in the tests; 3.8.0 is the version known to install offline here.
  python -m pip install -q -c "$constraints" "triton==3.8.0" 2>&1 | grep -v "is ignored" || true
fi
python -m pip install -q -c "$constraints" -e ".[$extras]" 2>&1 | grep -v "is ignored" || true
python -c "import velotune, torch; print('velotune', velotune.__version__, 'torch', torch.__version__)"
