"""The multi-turn env protocol, beside `Env`: an env starts an episode per sample, and the episode
answers each assistant turn with the env's messages. The trainer (lab/episodes.py) owns the
tokens: it samples, stitches the env's messages in as template-rendered ids (grpo/stitch.py) and
masks them out of the loss; the env only ever sees and writes text.

    episode = env.start(prompt, seed)           # one per sample (prompt i, member j)
    reply = episode.step(turn_text)             # Reply(messages, done, info)
    ...                                         # until done, or a stop rule (rollout.max_turns, budget)
    env.score(prompts, dialogues)               # [P][G] {component: value}, as Env.score

Tool-call syntax lives in the env: plain tags in the prompt for the tiny model (`<calc>` ...
`</calc>`, envs/calc.py), or the model's own format rendered by its chat template from `tools`
(Qwen2.5's `<tool_call>` JSON, envs/gsm8k_tools.py). A single-turn env is simply an `Env`: it
never starts an episode and its rollouts are one turn, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

from envs.base import Env
from grpo.data import Prompt, Scores


@dataclass
class Reply:
    """The env's answer to one assistant turn."""

    messages: list[dict]  # [{"role": "tool" | "user", "content": str}]: appended after the turn
    done: bool  # the episode is over (the model answered); messages are then not sent
    info: dict = field(default_factory=dict)  # this turn's counts: tool_calls, tool_errors


class Episode(Protocol):
    def step(self, text: str) -> Reply:
        """The env's reply to the assistant turn `text` (as sampled, tool tags included)."""


class StopRun(RuntimeError):
    """An env failure no single episode may absorb (a served env refusing a request, envs/remote.py):
    the episode loop lets it through and the run stops, where any other exception ends one episode."""


def end(episode: Optional[Episode]) -> None:
    """Release an episode the loop is done with: one held elsewhere (a served env's) has `close`."""
    close = getattr(episode, "close", None)
    if close is not None:
        close()


class MultiTurnEnv(Env, Protocol):
    max_tool_chars: int  # env message content is cut to this many characters (env.max_tool_chars)
    stop_tokens: tuple[str, ...]  # tokens that end a turn besides EOS (a tool call's closing tag)
    tools: Optional[list[dict]]  # JSON tool schemas the chat template renders, or None

    def start(self, prompt: Prompt, seed: int) -> Episode:
        """A fresh episode for one sample of `prompt`; `seed` makes a stochastic env repeatable."""

    def score(self, prompts: list[Prompt], dialogues: list[list[list[dict]]]) -> Scores:
        """Per prompt, per episode of its group (the messages after the prompt: assistant turns and
        the env's replies): {component: value}, None where the env cannot give it."""


def is_multi_turn(env: Env) -> bool:
    return callable(getattr(env, "start", None))


def final_turn(messages: list[dict]) -> str:
    """The last assistant turn's text (the answer an episode ended with), '' if none."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
