"""The Env protocol: where prompts come from and how completions are scored."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, TypeVar

T = TypeVar("T")


@dataclass
class Prompt:
    messages: list[dict]  # chat messages, rendered by the tokenizer's chat template
    answer: str  # the reference the scorer compares against
    meta: dict = field(default_factory=dict)


class Env(Protocol):
    def sample(self, n: int) -> list[Prompt]:
        """The next n prompts; deterministic given the seed; advances the cursor."""

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> list[list[float]]:
        """One list of rewards per prompt (its group of completions)."""

    def corpus(self) -> Iterator[str]:
        """Text the tiny model's tokenizer is trained on."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


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
