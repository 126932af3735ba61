#!/usr/bin/env bash
# The GPU paths, proved in order on a real machine; each check prints one verdict line
#   <check>: PASS|FAIL|SKIP <detail>
# and the script exits non-zero if any check failed. Logs and run dirs go to $SMOKE_DIR.
#   bash scripts/setup.sh && bash scripts/gpu_smoke.sh
# Runs offline on the tiny model; SMOKE_MODEL=qwen2.5-0.5b-instruct adds the real-model probe gap
# (it needs the hub or a local copy). Checks that need more GPUs than the machine has are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${SMOKE_DIR:-outputs/gpu-smoke/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
RUN=(log.wandb.mode=disabled log.progress=false)
failed=0

verdict() {  # name, rc, detail
  if [ "$2" = 0 ]; then echo "$1: PASS $3"; else echo "$1: FAIL (rc $2, log $OUT/$1.log) $3"; failed=1; fi
}

check() {  # name, GPUs needed, command...
  local name=$1 need=$2
  shift 2
  if [ "$GPUS" -lt "$need" ]; then echo "$name: SKIP needs $need GPUs, this machine has $GPUS"; return; fi
  "$@" >"$OUT/$name.log" 2>&1
  verdict "$name" $? "$(last_sync "$OUT/$name")"
}

last_sync() {  # the run dir's last verified sync, if it has one
  [ -f "$1/sync.jsonl" ] || return 0
  tail -n 1 "$1/sync.jsonl" | $PY -c "import json, sys; s = json.load(sys.stdin); \
print(f\"(last sync: step {s['step']}, {s['ms']:.0f} ms, probe |dlogprob| {s['probe_max_diff']:.2g})\")"
}

probe_gap() {  # name, model overrides...: bf16, weights unchanged, so the gap is kernels alone
  local name=$1
  shift
  if [ "$GPUS" -lt 1 ]; then echo "$name: SKIP no GPU"; return; fi
  $PY -m experiments.sync_latency hardware=gpu mode=reload "$@" model.dtype=bfloat16 bench.noise=0 \
    bench.repeats=1 mode.bridge.probe_tolerance=10 "${RUN[@]}" hydra.run.dir="$OUT/$name" >"$OUT/$name.log" 2>&1
  $PY - "$OUT/$name/sync.jsonl" <<'EOF'
import json, sys
import torch
from bridges.base import PROBE_TOLERANCE
try:
    gap = max(json.loads(line)["probe_max_diff"] for line in open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no sync recorded ({exc})")
tol = PROBE_TOLERANCE[torch.bfloat16]
print(f"bf16 probe gap {gap:.3g} with unchanged weights (tolerance {tol})")
sys.exit(gap > tol)
EOF
  verdict "$name" $? ""
}

echo "gpu smoke: $GPUS GPU(s), logs in $OUT"
check cuda_ipc 1 $PY -m pytest -q -m gpu tests/bridges/test_cuda_ipc.py
probe_gap probe_gap_tiny_bf16
if [ -n "${SMOKE_MODEL:-}" ]; then probe_gap probe_gap_real_bf16 "model=$SMOKE_MODEL"; fi
check broadcast_nccl_tp1 2 $PY train.py hardware=gpu_split mode=broadcast train.steps=3 "${RUN[@]}" \
  hydra.run.dir="$OUT/broadcast_nccl_tp1"
check broadcast_nccl_tp2 3 $PY train.py hardware=gpu_split mode=broadcast train.steps=3 hardware.vllm_tp=2 \
  'hardware.vllm_devices="1,2"' "${RUN[@]}" hydra.run.dir="$OUT/broadcast_nccl_tp2"
check shared_one_gpu 1 $PY train.py hardware=gpu mode=shared train.steps=3 "${RUN[@]}" hydra.run.dir="$OUT/shared_one_gpu"
check reload_one_gpu 1 $PY train.py hardware=gpu mode=reload train.steps=3 "${RUN[@]}" hydra.run.dir="$OUT/reload_one_gpu"
check broadcast_gloo_one_gpu 1 $PY train.py hardware=gpu mode=broadcast train.steps=3 "${RUN[@]}" \
  hydra.run.dir="$OUT/broadcast_gloo_one_gpu"
exit $failed
