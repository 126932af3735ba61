"""Digits: a task a randomly initialised tiny model can learn by RL on CPU in minutes.

Prompt: "Count on from k:" (k random). Reward: the fraction of the completion's non-whitespace
characters that are ASCII digits. A random model emits roughly uniform tokens, so chance is the
share of digit characters in the tokenizer's vocabulary: 0.08 for the default tiny tokenizer
(trained on this corpus plus GSM8K's). corpus() puts digit runs in the tokenizer, so digit tokens
exist; the reward is dense (every digit character counts), so group-relative advantages point at
"more digit tokens" from the first step and GRPO climbs towards 1.0. `answer` (k+1) is kept for the
samples log only.
"""

from __future__ import annotations

import random
from typing import Iterator

from envs.base import Prompt, PromptListEnv, PromptSampler

PHRASES = ("Count on from {k}:", "Continue counting from {k}:", "Next numbers after {k}:", "Count up from {k}:")
SYSTEM = "Answer with digits only."


def digit_fraction(text: str) -> float:
    """Share of non-whitespace characters that are ASCII digits; 0.0 when there are none."""
    chars = [c for c in text if not c.isspace()]
    return sum(c in "0123456789" for c in chars) / len(chars) if chars else 0.0


class DigitsEnv(PromptListEnv):
    def __init__(self, seed: int = 0, num_prompts: int = 512, system_prompt: str = SYSTEM):
        rng = random.Random(seed)
        self.system_prompt = system_prompt
        self.prompts = [
            Prompt(
                messages=[{"role": "system", "content": system_prompt},
                          {"role": "user", "content": rng.choice(PHRASES).format(k=k)}],
                answer=str(k + 1),
                meta={"k": k},
            )
            for k in (rng.randrange(1000) for _ in range(num_prompts))
        ]
        self.sampler = PromptSampler(self.prompts, seed)

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> list[list[float]]:
        return [[digit_fraction(c) for c in group] for group in completions]

    def corpus(self) -> Iterator[str]:
        for p in self.prompts:
            yield "\n".join(m["content"] for m in p.messages)
            k = p.meta["k"]
            yield " ".join(str(i) for i in range(k, k + 8))
