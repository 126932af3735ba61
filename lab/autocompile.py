"""`hardware.compile=auto`: torch.compile the trainer's model once the run has shown it repays.

Compiling costs a roughly fixed time in the first compiled step (it traces and builds kernels
for the decoder's graph, whatever its width) and saves a share of every train phase after it,
a share that depends on what the trainer computes in (experiments/RESULTS.md, "torch.compile"):
- fp32 (AVX2 CPUs): ~98 s of compiling at ~28M, train phase 15.4 -> 12.3 s (20 % saved), so it
  pays back after ~32 steps (2-core AVX2, idle machine, step_time `hardware.compile=false,true`);
- bf16 compute (mixed precision, AVX512-BF16/AMX CPUs): a 64 x 88-token train step 11.9 -> 1.4 s
  and 10.5 -> 6.1 s in two runs (88 % and 42 % saved), 78 s of compiling cold, 23 s with
  inductor's on-disk cache warm (experiments/compile_payback.py, 2-core AVX512-BF16+AMX, machine
  shared): paid back after 5-8 steps. SAVING takes the lower figure.
The toy model's 0.4 s train phase repays it in neither. `python -m experiments.compile_payback`
re-measures `compile_s`, `saving` and `payback_steps` on a machine.

So `auto` trains the first step eager, times its train phase, and compiles if the steps left
would save more than compiling costs: steps_left x SAVING[compute dtype] x train_s > COMPILE_S.
In fp32 that is train_s x steps_left > 500 s of eager training still to come (~28M: from ~34
steps left on; the toy model: from ~1250), in bf16 > 250 s (~28M: from ~21 steps left).
Compiled artefacts are cached across runs by inductor itself (its FX graph cache, on by default
in /tmp/torchinductor_<user>): a model compiled before compiles in about a third of the time,
which COMPILE_S, a cold compile, does not count on. `true` compiles before the first
step, `false` never.
"""

from __future__ import annotations

from runtime import distributed

import torch

COMPILE_S = 100.0  # seconds the first compiled step spends compiling (measured 98 s at ~28M, fp32)
# Share of the train phase a compiled model saves, by the trainer's compute dtype (~28M, above);
# a dtype not measured takes fp32's.
SAVING = {torch.float32: 0.2, torch.bfloat16: 0.4}


def worth_compiling(train_s: float, steps_left: int, compute: torch.dtype = torch.float32,
                    compile_s: float = COMPILE_S) -> bool:
    """Would compiling now repay itself over `steps_left` steps of `train_s` eager training each?"""
    return steps_left * SAVING.get(compute, SAVING[torch.float32]) * train_s > compile_s


def after_step(run, step: int, train_s: float) -> bool:
    """`hardware.compile=auto`, after the first step this process trained: compile the policy if
    the rest of the run repays it (every trainer process decides as rank 0 does). True if it did."""
    if run.cfg.hardware.compile != "auto" or run.policy.compiled or step != run.start_step + 1:
        return False
    left, compute = run.cfg.train.steps - step, run.policy.precision.compute
    decide = distributed.broadcast_object(worth_compiling(train_s, left, compute))
    if decide:
        run.policy.compile()
        run.logger.event(step, "compile", reason=f"auto: {left} steps left x {SAVING.get(compute, SAVING[torch.float32]):g}"
                         f" x train {train_s:.2f} s > {COMPILE_S:g} s of compiling")
    return decide
