"""GSM8K with a calculator, for real models: the model calls the tool in its own chat template's
tool-call format (Qwen2.5: `<tool_call>{"name": "calculator", "arguments": {"expression":
"48/2"}}</tool_call>`, the schema rendered into the prompt from `tools`), the env answers with a
`tool` message (the template renders it as the model expects: Qwen2.5's `<tool_response>`), and
math-verify scores the final turn as env=gsm8k scores a completion.

Reward components: GSM8K's `correct` and `format` on the final turn, plus `used_tool` (logged,
weight 0 by default: correctness is the goal). A turn without a tool call ends the episode.
"""

from __future__ import annotations

import json
import re
from typing import Mapping, Optional

from envs.calculator import CalcError, Calculator
from envs.episode import Reply, final_turn
from envs.gsm8k import REWARD_WEIGHTS, GSM8KEnv
from grpo.data import Prompt, RewardWeights, Scores

SYSTEM = ("Solve the problem step by step. Use the calculator tool for arithmetic. "
          "Give the final answer as a number in \\boxed{}.")
TOOL = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


class ToolCallEpisode:
    """Every `<tool_call>` of a turn is answered, in order; a turn without one ends the episode."""

    def __init__(self, calculator: Calculator):
        self.calculator = calculator

    def step(self, text: str) -> Reply:
        calls = TOOL_CALL.findall(text)
        if not calls:
            return Reply([], done=True)
        messages, errors = [], 0
        for call in calls:
            try:
                content = self._call(call)
            except CalcError as exc:
                content, errors = str(exc), errors + 1
            messages.append({"role": "tool", "content": content})
        return Reply(messages, done=False, info={"tool_calls": len(calls), "tool_errors": errors})

    def _call(self, call: str) -> str:
        try:
            request = json.loads(call)
            name, expression = request["name"], request["arguments"]["expression"]
        except (ValueError, KeyError, TypeError):
            raise CalcError('error: a tool call is {"name": "calculator", "arguments": {"expression": "..."}}') from None
        if name != "calculator":
            raise CalcError(f"error: no tool named {name!r}; the tool is 'calculator'")
        return self.calculator(str(expression))


class GSM8KToolsEnv(GSM8KEnv):
    stop_tokens = ()  # a tool-call turn ends with the model's EOS, as its template renders it
    tools = [TOOL]

    def __init__(self, *args, system_prompt: str = SYSTEM, max_tool_chars: int = 256,
                 reward_weights: Optional[Mapping[str, float]] = None, max_turns: int = 4,
                 max_total_tokens: Optional[int] = 1024, **kwargs):
        super().__init__(*args, system_prompt=system_prompt, **kwargs)
        self.max_turns, self.max_total_tokens = max_turns, max_total_tokens  # rollout.* follow them
        self.max_tool_chars, self.calculator = max_tool_chars, Calculator()
        self.reward_weights = RewardWeights({**REWARD_WEIGHTS, "used_tool": 0.0}, reward_weights)

    def start(self, prompt: Prompt, seed: int) -> ToolCallEpisode:
        return ToolCallEpisode(self.calculator)

    def score(self, prompts: list[Prompt], dialogues: list[list[list[dict]]]) -> Scores:
        """GSM8K's components on each episode's final turn (math-verify, in parallel), and `used_tool`."""
        scores = super().score(prompts, [[final_turn(d) for d in group] for group in dialogues])
        return [[{**s, "used_tool": float(any(m["role"] == "tool" for m in d))} for s, d in zip(row, group)]
                for row, group in zip(scores, dialogues)]
