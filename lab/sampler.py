"""Steps 1-2 of a GRPO step: sample the step's prompts, generate `group_size` completions of each
on vLLM (seeded by run seed, step and sampling round: grpo/seeds.py), score them with the env.

The synchronous loop calls it when a step needs its rollout; the producer thread of async GRPO
(runtime/async_rollout.py) calls it ahead of the trainer. Either way it runs on rank 0, the one
trainer process that talks to vLLM.
"""

from __future__ import annotations

from envs.base import Env
from envs.overlong import OverlongPenalty
from grpo import dynamic_sampling
from grpo.batch import Rollout
from grpo.seeds import rollout_seed
from lab.episodes import Turns
from runtime.logger import PhaseTimer
from serving.client import VLLMClient
from serving.guard import RestartGuard


class Sampler:
    def __init__(self, env: Env, turns: Turns, client: VLLMClient, guard: RestartGuard, overlong: OverlongPenalty,
                 train_cfg, trainer_procs: int = 1):
        self.env, self.turns, self.client, self.guard, self.overlong = env, turns, client, guard, overlong
        self.prompts, self.group_size, self.seed = train_cfg.prompts_per_step, train_cfg.group_size, train_cfg.seed
        self.dynamic, self.rounds = train_cfg.dynamic_sampling, train_cfg.max_sampling_rounds
        self.trainer_procs = trainer_procs
        # A multi-turn episode's later turns draw from seed bands this wide (grpo/seeds.py turn_seed).
        self.stride = self.prompts * self.group_size * (self.rounds if self.dynamic else 1)

    def generate(self, step: int, round_: int = 0) -> Rollout:
        """The step's prompts and vLLM's `group_size` completions (one turn, or episodes) of each."""
        prompts = self.env.sample(self.prompts)
        prompt_ids = [self.turns.encode(p.messages) for p in prompts]
        seed = rollout_seed(self.seed, step, round_, self.prompts * self.group_size)
        groups = self.guard.call(step, lambda: self.turns.generate(self.client, prompts, prompt_ids, self.group_size,
                                                                   seed, self.stride))
        return Rollout(prompts, prompt_ids, groups)

    def score(self, rollout: Rollout) -> None:
        """The env's reward components and their weighted sum, each [P, G]; one it could not give is NaN, never 0."""
        scores = self.overlong.add(self.turns.score(rollout.prompts, rollout.groups), rollout.groups)
        rollout.set_scores(scores, self.overlong.weights(self.env.reward_weights))

    def __call__(self, step: int) -> tuple[Rollout, dict]:
        """Step `step`'s rollout, generated and scored, and the phases' seconds."""
        timer = PhaseTimer()

        def draw(round_: int) -> Rollout:
            with timer("time_generate"):  # 1. vLLM samples group_size completions per prompt
                rollout = self.generate(step, round_)
            with timer("time_score"):  # 2. rewards [P, G]; one the env could not give is NaN, never 0
                self.score(rollout)
            return rollout

        # One round, or with train.dynamic_sampling as many as it takes to fill the step with untied groups
        rollout = dynamic_sampling.sample_groups(draw, self.prompts, self.group_size, self.rounds if self.dynamic else 0,
                                                 self.trainer_procs)
        return rollout, timer.seconds
