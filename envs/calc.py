"""Calc: arithmetic questions a model answers by calling a calculator, a multi-turn env
(envs/episode.py) that a tiny random model can learn to use on CPU.

Prompt: "What is 37*41?" (two 2-digit operands; +, -, *). A turn that ends with `</calc>` is a
tool call: the expression is the text from the last `<calc>` (or the turn's start) to `</calc>`,
evaluated by the safe calculator (envs/calculator.py); the env answers with a `tool` message, the
value (`1517`) or the calculator's error (`error: ...`), cut to `max_tool_chars`. A turn without a
call ends the episode: it is the answer. `<calc>` and `</calc>` are single tokens of the tiny
model's tokenizer (`vocabulary`), and `</calc>` ends a turn (`stop_tokens`).

Reward components: `correct` (the last number of the final turn, tool tags and their contents
left out, equals the answer) and `used_tool`: 1 if the episode made a call the calculator
evaluated, 0.5 if its calls were all refused (`error: ...`; the metric `tool_errors` counts them),
0 without a call. The half step makes the reward reachable for a random model: a bare `</calc>`
is found by chance (~5 % of first episodes), a well-formed call only by climbing from there.
Eval split `test`: questions no training prompt has; a pass is a correct answer.
"""

from __future__ import annotations

import operator
import random
import re
from typing import Iterator, Mapping, Optional

from envs.base import PromptListEnv, PromptSampler, held_out
from envs.calculator import ERROR, CalcError, Calculator
from envs.episode import Reply, final_turn
from grpo.data import Prompt, RewardWeights, Scores

OPEN, CLOSE = "<calc>", "</calc>"
SYSTEM = f"Compute with the calculator: {OPEN}expression{CLOSE}. Then answer with the number."
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
CALL = re.compile(re.escape(OPEN) + ".*?" + re.escape(CLOSE), re.S)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_of(text: str) -> Optional[str]:
    """The last number of `text` once its tool calls are cut out; None if it has none."""
    numbers = NUMBER.findall(CALL.sub(" ", text).replace(CLOSE, " "))
    return numbers[-1] if numbers else None


def tool_use(messages: list[dict]) -> float:
    """1.0 if a call evaluated, 0.5 if every call was refused, 0.0 without a call."""
    replies = [m["content"] for m in messages if m["role"] == "tool"]
    if not replies:
        return 0.0
    return 0.5 if all(r.startswith(ERROR) for r in replies) else 1.0


class CalcEpisode:
    """One sample's episode: every turn ending in `</calc>` is evaluated, any other ends it."""

    def __init__(self, calculator: Calculator):
        self.calculator = calculator

    def step(self, text: str) -> Reply:
        if not text.rstrip().endswith(CLOSE):
            return Reply([], done=True)
        expression = text.rstrip()[: -len(CLOSE)].rsplit(OPEN, 1)[-1]
        try:
            result, errors = self.calculator(expression), 0
        except CalcError as exc:
            result, errors = str(exc), 1
        return Reply([{"role": "tool", "content": result}], done=False, info={"tool_calls": 1, "tool_errors": errors})


def _question(rng: random.Random) -> tuple[int, str, int]:
    return rng.randrange(10, 100), rng.choice(list(OPS)), rng.randrange(10, 100)


class CalcEnv(PromptListEnv):
    vocabulary = (OPEN, CLOSE)  # single tokens of the tiny model's tokenizer (runtime/tiny_model.py)
    stop_tokens = (CLOSE,)
    tools = None  # the syntax is in the system prompt: the tiny template renders no tools

    def __init__(self, seed: int = 0, num_prompts: int = 512, system_prompt: str = SYSTEM, max_tool_chars: int = 64,
                 max_expression_chars: int = 64, reward_weights: Optional[Mapping[str, float]] = None,
                 max_tokens: int = 16, max_turns: int = 3, max_total_tokens: Optional[int] = 96):
        # What an episode may take (rollout.max_tokens, max_turns and max_total_tokens follow them):
        # a turn's tokens, its turns, and all its tokens after the prompt, sampled + env.
        self.max_tokens, self.max_turns, self.max_total_tokens = max_tokens, max_turns, max_total_tokens
        rng = random.Random(seed)
        self.system_prompt, self.max_tool_chars = system_prompt, max_tool_chars
        self.prompts = [self._prompt(*_question(rng)) for _ in range(num_prompts)]
        self.sampler = PromptSampler(self.prompts, seed)
        trained = {p.messages[-1]["content"] for p in self.prompts}
        eval_rng = random.Random(f"calc-test-{seed}")
        test = (self._prompt(*_question(eval_rng)) for _ in range(4 * num_prompts))
        self.test_prompts = list({p.messages[-1]["content"]: p for p in test
                                  if p.messages[-1]["content"] not in trained}.values())
        self.calculator = Calculator(max_chars=max_expression_chars)
        self.reward_weights = RewardWeights({"correct": 1.0, "used_tool": 1.0}, reward_weights)

    def _prompt(self, a: int, op: str, b: int) -> Prompt:
        expression = f"{a}{op}{b}"
        return Prompt(messages=[{"role": "system", "content": self.system_prompt},
                                {"role": "user", "content": f"What is {expression}?"}],
                      answer=str(OPS[op](a, b)),
                      meta={"expression": expression})

    def start(self, prompt: Prompt, seed: int) -> CalcEpisode:
        return CalcEpisode(self.calculator)

    def eval_prompts(self, split: str, n: int) -> list[Prompt]:
        if split != "test":
            raise ValueError(f"eval.split={split!r}: Calc has one held-out split, 'test' (questions never trained on)")
        return held_out(self.test_prompts, n, split)

    def score(self, prompts: list[Prompt], dialogues: list[list[list[dict]]]) -> Scores:
        return [[{"correct": float(answer_of(final_turn(d)) == p.answer), "used_tool": tool_use(d)} for d in group]
                for p, group in zip(prompts, dialogues)]

    def success(self, components: Mapping[str, Optional[float]]) -> bool:
        return components["correct"] == 1.0

    def corpus(self) -> Iterator[str]:
        for p in self.prompts:
            expression = p.meta["expression"]
            yield "\n".join(m["content"] for m in p.messages)
            yield f"{OPEN}{expression}{CLOSE}\n{p.answer}\n{p.answer}"
