"""`hardware.compile=auto`: torch.compile the trainer's model once the run has shown it repays.

Compiling costs a roughly fixed time in the first compiled step (it traces and builds kernels
for the decoder's graph, whatever its width) and saves a share of every train phase after it,
a share that depends on what the trainer computes in. Measured on idle 2-core machines
(experiments/RESULTS.md, "torch.compile"):
- fp32: at ~28M the train phase 15.4 -> 12.3 s (20 % saved) on the AVX2 machine, ~98 s of
  compiling cold; `experiments.compile_payback --size 28m --autocast none` on the AVX512-BF16
  machine 3.64 -> 3.32 s (9 %);
- bf16 compute (mixed precision, AVX512-BF16/AMX CPUs): `experiments.compile_payback --size 28m`
  1.91 -> 1.39 s (27 %), 13.6 s of compiling with inductor's on-disk cache warm.
SAVING takes the lower figure of each, COMPILE_S a cold compile. The toy model's 0.1-0.4 s train
phase repays it in neither. `python -m experiments.compile_payback` re-measures `compile_s`,
`saving` and `payback_steps` on a machine.

So `auto` trains the first step eager, times its train phase, and compiles if the steps left
would save more than compiling costs: steps_left x SAVING[compute dtype] x train_s > COMPILE_S,
i.e. more than 1000 s (fp32) or 400 s (bf16) of eager training still to come: ~28M in bf16
(2.5 s a train phase at 8 x 8 x 64 tokens) from ~160 steps left on, ~85M x 256 tokens (21 s)
from ~20. Compiled artefacts are cached across runs by inductor itself (its FX graph cache, on
by default in /tmp/torchinductor_<user>): a model compiled before compiles in a fraction of the
time, which COMPILE_S does not count on. `true` compiles before the first step, `false` never.
"""

from __future__ import annotations

from runtime import distributed

import torch

COMPILE_S = 100.0  # seconds the first compiled step spends compiling, cold (98 s at ~28M, fp32, AVX2)
# Share of the train phase a compiled model saves, by the trainer's compute dtype (~28M, idle, the
# lower of the measurements above); a dtype not measured takes fp32's.
SAVING = {torch.float32: 0.1, torch.bfloat16: 0.25}


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
