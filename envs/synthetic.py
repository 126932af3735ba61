"""Digits: a task a randomly initialised tiny model can learn by RL on CPU in minutes.

Prompt: "Count on from k:" (k random). Reward: the fraction of the completion's non-whitespace
characters that are ASCII digits. A random model emits roughly uniform tokens, so chance is the
share of digit characters in the tokenizer's vocabulary: 0.08 for the default tiny tokenizer
(trained on this corpus plus GSM8K's). corpus() puts digit runs in the tokenizer, so digit tokens
exist; the reward is dense (every digit character counts), so group-relative advantages point at
"more digit tokens" from the first step and GRPO climbs towards 1.0. `answer` (k+1) is kept for the
samples log only.

One reward component, `digits` (the fraction above). Eval split `test`: prompts whose start number
k no training prompt has, so a pass counts digits produced for numbers never trained on; a
completion passes when it is all digits (`digits` == 1).
"""

from __future__ import annotations

import random
from typing import Iterator, Mapping, Optional

from envs.base import PromptListEnv, PromptSampler, held_out
from grpo.data import Prompt, RewardWeights, Scores

PHRASES = ("Count on from {k}:", "Continue counting from {k}:", "Next numbers after {k}:", "Count up from {k}:")
SYSTEM = "Answer with digits only."
NUMBERS = 1000  # start numbers k are drawn from range(NUMBERS); those never drawn are held out


def digit_fraction(text: str) -> float:
    """Share of non-whitespace characters that are ASCII digits; 0.0 when there are none."""
    chars = [c for c in text if not c.isspace()]
    return sum(c in "0123456789" for c in chars) / len(chars) if chars else 0.0


def _prompt(k: int, rng: random.Random, system_prompt: str) -> Prompt:
    return Prompt(messages=[{"role": "system", "content": system_prompt},
                            {"role": "user", "content": rng.choice(PHRASES).format(k=k)}],
                  answer=str(k + 1), meta={"k": k})


class DigitsEnv(PromptListEnv):
    def __init__(self, seed: int = 0, num_prompts: int = 512, system_prompt: str = SYSTEM,
                 reward_weights: Optional[Mapping[str, float]] = None, max_tokens: int = 16):
        self.max_tokens = max_tokens
        rng = random.Random(seed)
        self.system_prompt = system_prompt
        self.prompts = [_prompt(k, rng, system_prompt) for k in (rng.randrange(NUMBERS) for _ in range(num_prompts))]
        self.sampler = PromptSampler(self.prompts, seed)
        trained = {p.meta["k"] for p in self.prompts}
        unseen = [k for k in range(NUMBERS) if k not in trained]
        eval_rng = random.Random(f"digits-test-{seed}")
        eval_rng.shuffle(unseen)
        self.test_prompts = [_prompt(k, eval_rng, system_prompt) for k in unseen]
        self.reward_weights = RewardWeights({"digits": 1.0}, reward_weights)

    def eval_prompts(self, split: str, n: int) -> list[Prompt]:
        if split != "test":
            raise ValueError(f"eval.split={split!r}: Digits has one held-out split, 'test' "
                             "(start numbers no training prompt has)")
        return held_out(self.test_prompts, n, split)

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> Scores:
        return [[{"digits": digit_fraction(c)} for c in group] for group in completions]

    def success(self, components: Mapping[str, Optional[float]]) -> bool:
        return components["digits"] == 1.0

    def corpus(self) -> Iterator[str]:
        for p in self.prompts:
            yield "\n".join(m["content"] for m in p.messages)
            k = p.meta["k"]
            yield " ".join(str(i) for i in range(k, k + 8))
