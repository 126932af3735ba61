#!/usr/bin/env bash
# The users' setup on a real GPU: a bf16 model with tied embeddings through every weight-sync
# mode, plus the paths only GPUs have (CUDA IPC, NCCL). One verdict line per check,
#   <check>: PASS|FAIL|SKIP <detail>
# and a non-zero exit if any check failed. Logs and run dirs go to $SMOKE_DIR.
#   bash scripts/setup.sh && bash scripts/gpu_smoke.sh [--cpu] [MODEL]
# MODEL: a conf/model/ preset (default qwen2.5-0.5b-instruct: bf16, tied embeddings) or a model
# path or hub id, run with that preset's settings (any bf16 model with tied embeddings).
# --cpu (or GRPO_SMOKE_CPU=1): the same mode checks on this CPU with the tiny model, tied and bf16.
#
# First `model`: the weights load (the GPU machine may be offline: pass a local copy) and are what
# they should be (dtype bfloat16, tie_word_embeddings True); a FAIL there stops the script.
# Each mode <m> trains SMOKE_STEPS (2) steps with model.dtype=bfloat16, a sync after each, then
# scripts/smoke_check.py reads its sync.jsonl:
#   <m>/run             train.py exited 0 (the bridge verifies every sync; a failed one stops it)
#   <m>/syncs           a verified sync at every step
#   <m>/probe_gap       vLLM vs trainer probe |dlogprob| <= SMOKE_TOL (0.15: bf16's) at every sync
#   <m>/served_changed  vLLM's own probe logprobs moved > SMOKE_MOVED (1e-3) at every sync
#   <m>/in_place        reload, lora_merge, legacy: every sync after the first writes fewer bytes
#                       than the first (a full save): the tied lm_head no longer forces a rewrite
# Modes: reload, legacy (restarts on the one served/ dir), lora_merge, lora_adapter, shared,
# broadcast (one GPU: gloo through host memory), lora_broadcast (merged LoRA over gloo);
# broadcast_nccl_tp1/tp2 need 2/3 GPUs, lora_broadcast_nccl 2.
# Knobs: SMOKE_MODES (a subset, space-separated), SMOKE_LR / SMOKE_LORA_LR (steps big enough to
# move bf16 weights: 1e-4 / 1e-3), SMOKE_SHARED_ARGS (shared's extra overrides; none by default:
# model.master_dtype=auto makes shared pure bf16, every other mode fp32 masters), SMOKE_DIR, PY.
set -uo pipefail
cd "$(dirname "$0")/.."
CPU=${GRPO_SMOKE_CPU:-0}
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
PRESET=${1:-qwen2.5-0.5b-instruct}
PY=${PY:-.venv/bin/python}
OUT=${SMOKE_DIR:-outputs/gpu-smoke/$(date +%Y%m%d-%H%M%S)}
STEPS=${SMOKE_STEPS:-2}
TOL=${SMOKE_TOL:-0.15}
MOVED=${SMOKE_MOVED:-1e-3}
MODES=${SMOKE_MODES:-reload legacy lora_merge lora_adapter shared broadcast lora_broadcast broadcast_nccl_tp1 broadcast_nccl_tp2 lora_broadcast_nccl}
SHARED_ARGS=${SMOKE_SHARED_ARGS-}
mkdir -p "$OUT"

if [ "$CPU" = 1 ]; then
  GPUS=0
  MODEL=(model=tiny model.tiny.tie_word_embeddings=true)
  HW=hardware=cpu
elif [ -f "conf/model/$PRESET.yaml" ]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
  MODEL=("model=$PRESET")
  HW=hardware=gpu
  WEIGHTS=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['model']['path'])" "conf/model/$PRESET.yaml")
else
  GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
  MODEL=(model=qwen2.5-0.5b-instruct "model.path=$PRESET")
  HW=hardware=gpu
  WEIGHTS=$PRESET
fi
RUN=(model.dtype=bfloat16 "train.steps=$STEPS" train.prompts_per_step=2 train.group_size=4 rollout.max_tokens=16
     eval.enabled=false log.wandb.mode=disabled log.progress=false)
failed=0

verdict() {  # name, rc, detail
  if [ "$2" = 0 ]; then echo "$1: PASS $3"; else echo "$1: FAIL (rc $2, log $OUT/$1.log) $3"; failed=1; fi
}

wanted() { [[ " $MODES " == *" $1 "* ]]; }

mode_check() {  # name, GPUs needed (0: CPU too), in_place (0/1), learning rate, hardware, train.py overrides...
  local name=$1 need=$2 in_place=$3 lr=$4 hw=$5
  shift 5
  wanted "$name" || return 0
  if [ "$need" -gt 0 ] && [ "$GPUS" -lt "$need" ]; then echo "$name: SKIP needs $need GPUs, this run has $GPUS"; return; fi
  $PY train.py "${MODEL[@]}" "$hw" "${RUN[@]}" "optimizer.lr=$lr" "$@" hydra.run.dir="$OUT/$name" >"$OUT/$name.log" 2>&1
  verdict "$name/run" $? "(train.py ${*})"
  $PY scripts/smoke_check.py "$OUT/$name" --name "$name" --steps "$STEPS" --tol "$TOL" --moved "$MOVED" \
    $([ "$in_place" = 1 ] && echo --in-place) || failed=1
}

check() {  # name, GPUs needed, command...
  local name=$1 need=$2
  shift 2
  if [ "$GPUS" -lt "$need" ]; then echo "$name: SKIP needs $need GPUs, this run has $GPUS"; return; fi
  "$@" >"$OUT/$name.log" 2>&1
  verdict "$name" $? ""
}

LR=${SMOKE_LR:-1e-4}
LORA_LR=${SMOKE_LORA_LR:-1e-3}
echo "smoke: ${MODEL[*]} $HW, $GPUS GPU(s), logs in $OUT"
if [ "$CPU" != 1 ]; then  # the machine may be offline: a hub id needs its local copy
  detail=$($PY -c "import sys, torch; from transformers import AutoConfig; c = AutoConfig.from_pretrained(sys.argv[1]); \
line = f'{sys.argv[1]}: dtype {c.torch_dtype}, tie_word_embeddings {c.tie_word_embeddings}'; \
sys.exit(line) if c.torch_dtype != torch.bfloat16 or not c.tie_word_embeddings else print(line)" \
    "$WEIGHTS" 2>&1 | tee "$OUT/model.log" | tail -n 1)
  verdict model $? "$detail"
  [ "$failed" = 0 ] || exit 1
fi
check cuda_ipc 1 $PY -m pytest -q -m gpu tests/bridges/test_cuda_ipc.py
mode_check reload 0 1 "$LR" "$HW" mode=reload
mode_check legacy 0 1 "$LR" "$HW" mode=legacy sync.sync_every=1
mode_check lora_merge 0 1 "$LORA_LR" "$HW" mode=lora
mode_check lora_adapter 0 0 "$LORA_LR" "$HW" mode=lora sync=adapter
# shellcheck disable=SC2086  # SHARED_ARGS: zero or more overrides
mode_check shared 0 0 "$LR" "$HW" mode=shared $SHARED_ARGS
mode_check broadcast 0 0 "$LR" "$HW" mode=broadcast
mode_check lora_broadcast 0 0 "$LORA_LR" "$HW" finetune=lora sync=broadcast
mode_check broadcast_nccl_tp1 2 0 "$LR" hardware=gpu_split mode=broadcast
mode_check broadcast_nccl_tp2 3 0 "$LR" hardware=gpu_split mode=broadcast hardware.vllm_tp=2 'hardware.vllm_devices="1,2"'
mode_check lora_broadcast_nccl 2 0 "$LORA_LR" hardware=gpu_split finetune=lora sync=broadcast
exit $failed
