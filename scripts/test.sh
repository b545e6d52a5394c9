#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole suite.
# The tests run in one worker process per core (pytest-xdist; each worker computes with one torch thread, so the
# workers do not fight over cores); VELOTUNE_TEST_WORKERS=0 runs them in this process, one after another.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# (not `nproc`: it reads OMP_NUM_THREADS, set to 1 above)
workers="${VELOTUNE_TEST_WORKERS:-$(python -c 'import os; print(len(os.sched_getaffinity(0)))')}"
parallel=()
if [ "$workers" -gt 1 ]; then
  # worksteal: a worker that runs out takes queued tests from the other, so one long test does not end the run alone.
  parallel=(-n "$workers" --dist worksteal)
fi
exec python -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@"
