"""The records that travel down from the envs and the server into the algorithm: a prompt, a
sampled completion, the env's scores and the weights that sum them into the reward. They live at
the ground so the maths (grpo/batch.py) needs neither an env nor a server to be built or tested.

A score is a dict of named reward components per completion (GSM8K: `correct`, `format`); the
reward GRPO trains on is their weighted sum (`RewardWeights`, weights from `env.reward_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, TypeVar

T = TypeVar("T")
Scores = list[list[dict[str, Optional[float]]]]  # [P][G] {component: value, None where not given}


@dataclass
class Prompt:
    messages: list[dict]  # chat messages, rendered by the tokenizer's chat template
    answer: str  # the reference the scorer compares against
    meta: dict = field(default_factory=dict)


class RewardWeights:
    """An env's reward components and their weights; the reward is the weighted sum.

    `defaults` names every component the env produces with its default weight; `overrides` (the
    config's `env.reward_weights`) may reweight them but not invent one: a name the env does not
    produce fails here, at start, naming its key.
    """

    def __init__(self, defaults: Mapping[str, float], overrides: Optional[Mapping[str, float]] = None):
        overrides = dict(overrides or {})
        for name in overrides:
            if name not in defaults:
                raise ValueError(f"env.reward_weights.{name}: this env has no reward component {name!r} "
                                 f"(it produces {sorted(defaults)})")
        self.weights = {**defaults, **overrides}
        if not any(self.weights.values()):
            raise ValueError(f"env.reward_weights={self.weights}: every weight is 0, nothing to train on")

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def total(self, components: Mapping[str, T]) -> T:
        """Weighted sum of the components (floats or [P, G] tensors); a 0-weight one is left out,
        so a component the env could not give (NaN) spoils the total only if it counts."""
        return sum(w * components[name] for name, w in self.weights.items() if w)



@dataclass
class Dialogue:
    """What a multi-turn episode added after its prompt (lab/episodes.py): the messages in order
    (assistant turns as sampled, env messages as sent), why it stopped, and its tool use."""

    messages: list[dict]  # [{"role": "assistant" | "tool" | "user", "content": str}, ...]
    stop: str  # eos | length | max_turns | budget | error (STOP_REASONS)
    tool_calls: int = 0
    tool_errors: int = 0
    error: Optional[str] = None  # what the env raised (stop == "error")
    spans: list[tuple[str, int]] = field(default_factory=list)  # the completion's text in runs of its mask: (text, 1 sampled | 0 env)

    @property
    def turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


STOP_REASONS = ("eos", "length", "max_turns", "budget", "error")


@dataclass
class Completion:
    token_ids: list[int]  # [C_i] sampled ids, EOS included when the model stopped (multi-turn: + env ids)
    logprobs: list[float]  # [C_i] vLLM's logprob of each sampled id (0.0 at env positions)
    text: str
    finish_reason: str  # "stop" | "length" (multi-turn: the last turn's)
    mask: Optional[list[int]] = None  # [C_i] 1 on sampled ids, 0 on env ids; None: every id sampled
    dialogue: Optional[Dialogue] = None  # the turns of a multi-turn episode; None: one turn

    @property
    def sampled_mask(self) -> list[int]:
        return [1] * len(self.token_ids) if self.mask is None else self.mask
