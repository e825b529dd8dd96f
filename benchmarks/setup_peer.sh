#!/usr/bin/env bash
# Creates benchmarks/.venv-peer: imagen-pytorch on CPU torch, for side_by_side.py's peer worker.
# Kept apart from the project venv so torch never becomes an imagen-jax dependency.
#   bash benchmarks/setup_peer.sh [PYTHON]      (PYTHON: a Python >= 3.10, default python3)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-peer"
python="${1:-python3}"
torch_version=2.13.0
torchvision_version=0.28.0
imagen_version=2.1.0  # the version the README's figures were measured against

"$python" -m venv "$venv"
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
# Without these pins pip resolves imagen-pytorch's torch/torchvision requirements to CUDA builds.
printf 'torch==%s\ntorchvision==%s\n' "$torch_version" "$torchvision_version" >"$pins"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "torch==$torch_version"
"$venv/bin/pip" install --quiet -c "$pins" "imagen-pytorch==$imagen_version"
"$venv/bin/python" "$here/peer_worker.py" --check
echo "peer venv ready: $venv"
