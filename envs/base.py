"""The Env protocol: where prompts come from, how completions are scored, and what a held-out
evaluation asks of an env.

A score is a dict of named reward components per completion (GSM8K: `correct`, `format`); the
reward GRPO trains on is their weighted sum (`RewardWeights`, weights from `env.reward_weights`),
and every component is logged on its own, so a run shows which part of the reward moves.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence, TypeVar, runtime_checkable

from grpo.batch import Rollout
from grpo.data import Prompt, RewardWeights, Scores

T = TypeVar("T")

class Env(Protocol):
    reward_weights: RewardWeights  # the components score() returns, and their weights
    # Tokens an answer needs: `env.max_tokens`, which rollout.max_tokens follows unless set.
    max_tokens: int

    def sample(self, n: int) -> list[Prompt]:
        """The next n prompts; deterministic given the seed; advances the cursor."""

    def eval_prompts(self, split: str, n: int) -> list[Prompt]:
        """The first n prompts of held-out `split` (fixed, whatever the cursor), none of them a
        training prompt. An unknown split, or one with fewer than n prompts, fails naming
        `eval.split` / `eval.num_prompts`."""

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> Scores:
        """Per prompt, per completion of its group: {component: value} for every name in
        `reward_weights` (None where the env cannot give it, never a silent 0)."""

    def success(self, components: Mapping[str, Optional[float]]) -> bool:
        """Whether one completion solved its prompt (what pass@k counts)."""

    def corpus(self) -> Iterator[str]:
        """Text the tiny model's tokenizer is trained on."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...

    # Optional capability, for a supervised warm start (lab/sft.py): `reference(prompt) -> str`, the
    # completion text this env grades as correct for `prompt` (reasoning-gym: `<answer>42</answer>`,
    # GSM8K: `#### 72`). Envs without reference answers (Digits) leave it out; `references` says so.


def references(env: Env, prompts: Sequence[Prompt]) -> list[str]:
    """The reference completion of each prompt (the env's optional `reference`), or an error naming
    the env that has none."""
    if not callable(getattr(env, "reference", None)):
        raise ValueError(f"env={type(env).__name__} gives no reference answers (no `reference(prompt)`): "
                         "a supervised warm start needs an env that has them (reasoning_gym, arith, gsm8k)")
    return [env.reference(p) for p in prompts]


# A step's rollout, generated and scored: `(step) -> (Rollout, phase seconds)` (lab/sampler.py's
# Sampler, or what a RolloutSourceEnv brings); the loop, inline or async, only calls it.
RolloutSource = Callable[[int], tuple[Rollout, dict]]


@runtime_checkable
class RolloutSourceEnv(Protocol):
    """An env whose rollouts arrive generated and scored from elsewhere (env=atropos): the run
    takes `rollouts(policy, client)` as its rollout source instead of sampling and scoring."""

    def rollouts(self, policy, client) -> RolloutSource: ...


class PromptSampler:
    """Epoch-wise shuffled walk over items; its state (epoch, position) makes resume exact."""

    def __init__(self, items: Sequence[T], seed: int = 0):
        if not items:
            raise ValueError("no items to sample prompts from")
        self.items = items
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[T]:
        out = []
        for _ in range(n):
            if self.position == len(self.items):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.items[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._shuffle()


class PromptListEnv:
    """Cursor and resume for envs that walk a fixed list of prompts; subclasses set `self.sampler`."""

    sampler: PromptSampler

    def sample(self, n: int) -> list[Prompt]:
        return self.sampler.take(n)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        pass


def held_out(prompts: Sequence[Prompt], n: int, split: str) -> list[Prompt]:
    """The first n prompts of an eval split, or an error naming the key that asked for too many."""
    if n > len(prompts):
        raise ValueError(f"eval.num_prompts={n}: eval.split={split!r} has only {len(prompts)} prompts")
    return list(prompts[:n])
