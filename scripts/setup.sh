#!/usr/bin/env bash
# Creates .venv and installs velotune into it, torch first.
# Why torch first: a bare `torch` requirement on a machine without torch pulls the multi-GB CUDA build;
# installing the pinned CPU build first makes every later range resolve to it.
#   scripts/setup.sh          everything the README's commands need (train, chat, serve, export, demo)
#   scripts/setup.sh --test   also the test tools (peft, bitsandbytes, gguf, datasets, triton, server clients)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${VELOTUNE_TORCH:-2.13.0}"
PY="${PYTHON:-python3}"

# Disk: the test install takes about 3.5 GB in .venv. pip keeps no cache copy of what it installs (the wheels lie on
# this disk or come once from the registry), and unpacks on the checkout's own disk when the temp dir is short of
# room (a small /tmp made a CI run fail with "No space left on device").
export PIP_NO_CACHE_DIR=1
free_mb() { df -Pm "$1" 2>/dev/null | awk 'NR==2 {print $4}'; }
tmp_free=$(free_mb "${TMPDIR:-/tmp}"); tmp_free=${tmp_free:-0}
here_free=$(free_mb .); here_free=${here_free:-0}
if [ "$tmp_free" -lt 2048 ] && [ "$here_free" -gt "$tmp_free" ]; then
  mkdir -p .venv-tmp && export TMPDIR="$PWD/.venv-tmp"
fi
cleanup() { rm -rf .venv-tmp; }
trap cleanup EXIT

# pip with its noise filtered out, failing when pip fails (and saying how much room was left when that was why).
quiet_pip() {
  local log; log=$(mktemp)
  if ! python -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" | tail -n 30
    if grep -q "No space left" "$log"; then
      echo "setup: out of disk installing $*: free MB here $(free_mb .), in ${TMPDIR:-/tmp} $(free_mb "${TMPDIR:-/tmp}"); the test install needs about 4000" >&2
    fi
    rm -f "$log"; return 1
  fi
  rm -f "$log"
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null \
  || quiet_pip "torch==$TORCH_VERSION"
constraints=$(mktemp); trap 'rm -f "$constraints"; cleanup' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"
extras="quant,export,data,serve,studio,audio"
if [ "${1:-}" = "--test" ]; then
  extras="test,quant,export,data,serve,studio,audio,tts"
  # triton runs our kernels under TRITON_INTERPRET=1 in the tests; 3.8.0 is the version known to install offline here.
  quiet_pip -c "$constraints" "triton==3.8.0"
fi
quiet_pip -c "$constraints" -e ".[$extras]"
if [ "${1:-}" = "--test" ]; then
  # Debian packages the tests drive: chromium (the Studio's browser tests, through playwright, which cannot
  # download browsers here) and espeak-ng (speech clips for the Whisper tests).
  missing=""
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq >/dev/null 2>&1 || true
      # shellcheck disable=SC2086
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null 2>&1 \
        || echo "setup: apt-get install$missing failed: the tests that need them will fail or skip" >&2
    else
      echo "setup:$missing missing and not installable here (needs root and apt-get): install them for the tests" >&2
    fi
  fi
fi
python -c "import velotune, torch; print('velotune', velotune.__version__, 'torch', torch.__version__)"
