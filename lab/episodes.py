"""How a step's completions are drawn and scored: one turn (`OneTurn`, every `Env`), or multi-turn
episodes (`Episodes`, an env with `start`: envs/episode.py), token in / token out across turns.

An episode's completion is the ids after its prompt: each turn's sampled ids and logprobs appended
verbatim (mask 1), the env's replies as ids of the chat template's render difference
(grpo/stitch.py; mask 0, logprob 0). Stop rules, first that applies (`Dialogue.stop`):
- `eos`: the model ended the episode (a turn the env answers with done);
- `length`: a turn cut by `rollout.max_tokens` (never stitched: it has no end to stitch after);
- `max_turns`: `rollout.max_turns` turns sampled;
- `budget`: `rollout.max_total_tokens` (sampled + env ids) reached: a turn cut by what is left of
  it, or an env reply that would leave no token for the next turn (not appended);
- `error`: the env raised; the reward is NaN and the whole completion masked, the run goes on
  (but for `StopRun`: a served env refusing a request stops the run).
Turn 1 is the single-turn request (seeds as grpo/seeds.py); every later turn is one batch of
requests over the live episodes, seeded from (seed, step, sample, turn) (`seeds.turn_seed`), so a
resumed run repeats its episodes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable, Optional, Protocol

from envs.base import Env
from envs.episode import Episode, MultiTurnEnv, StopRun, end, is_multi_turn
from grpo.data import Completion, Dialogue, Prompt, Scores
from grpo.seeds import prompt_seeds, turn_seed
from grpo.stitch import ChatTemplate
from serving.client import VLLMClient


class Turns(Protocol):
    def encode(self, messages: list[dict]) -> list[int]:
        """A prompt's token ids: the chat template, generation prompt added."""

    def generate(self, client: VLLMClient, prompts: list[Prompt], prompt_ids: list[list[int]], n: int,
                 seed: Optional[int], stride: int) -> list[list[Completion]]:
        """[P][G] completions; `seed` as VLLMClient.generate's, `stride` the step's (or eval's) samples."""

    def score(self, prompts: list[Prompt], groups: list[list[Completion]]) -> Scores:
        """The env's scores of the completions (NaN rule: None where it gives none)."""


class OneTurn:
    """A single-turn env: one request per prompt, the completion's text scored."""

    def __init__(self, env: Env, encode: Callable[[list[dict]], list[int]]):
        self.env, self.encode = env, encode

    def generate(self, client, prompts, prompt_ids, n, seed, stride):
        return client.generate(prompt_ids, n=n, seed=seed)

    def score(self, prompts, groups):
        return self.env.score(prompts, [[c.text for c in group] for group in groups])


@dataclass
class _Live:
    """One episode while it runs."""

    prompt_ids: list[int]
    seed: int  # its first turn's
    episode: Optional[Episode]  # None: start() raised
    conversation: list[dict]  # prompt messages + every message so far: what the template renders
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    tool_calls: int = 0
    tool_errors: int = 0
    stop: Optional[str] = None
    error: Optional[str] = None
    finish_reason: str = "stop"
    cap: int = 0  # the token cap of the turn in flight

    def __post_init__(self):
        self.prompt_messages = len(self.conversation)


class Episodes:
    """Multi-turn episodes of `env` on the model whose tokenizer `template` wraps; see the module."""

    def __init__(self, env: MultiTurnEnv, template: ChatTemplate, max_turns: int, max_total_tokens: Optional[int]):
        self.env, self.template, self.max_turns = env, template, max_turns
        self.budget = max_total_tokens or 1 << 62
        template.check_prefix_preserving()  # refuses, naming the model, before any step
        tokenizer = template.tokenizer
        self.stop_ids = []
        for token in env.stop_tokens:
            ids = tokenizer(token, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"{template.name}: the env's stop token {token!r} is {len(ids)} tokens; a turn "
                                 "can only end on a single token (the tiny model learns the env's `vocabulary`)")
            self.stop_ids += ids

    def encode(self, messages: list[dict]) -> list[int]:
        return self.template.prompt_ids(messages)

    def generate(self, client: VLLMClient, prompts: list[Prompt], prompt_ids: list[list[int]], n: int,
                 seed: Optional[int], stride: int) -> list[list[Completion]]:
        cap = client.max_tokens  # each turn's (rollout.max_tokens; eval.max_tokens in evals)
        seeds = prompt_seeds(seed or 0, len(prompts), n)
        live = [self._start(p, ids, s + j) for p, ids, s in zip(prompts, prompt_ids, seeds) for j in range(n)]
        turns = [c for group in client.generate(prompt_ids, n=n, seed=seed, stop_token_ids=self.stop_ids) for c in group]
        for e in live:
            e.cap = cap
        running = live
        for turn in range(1, self.max_turns + 1):
            running = [e for e, out in zip(running, turns) if self._after_turn(e, out, turn, cap)]
            if not running:
                break
            for e in running:
                e.cap = min(cap, self.budget - len(e.ids))
            turns = client.continue_each([e.prompt_ids + e.ids for e in running],
                                         [turn_seed(e.seed, turn, stride) for e in running],
                                         [e.cap for e in running], self.stop_ids)
        for e in live:
            end(e.episode)
        return [[self._completion(e) for e in live[i * n:(i + 1) * n]] for i in range(len(prompts))]

    def _start(self, prompt: Prompt, prompt_ids: list[int], seed: int) -> _Live:
        try:
            return _Live(prompt_ids, seed, self.env.start(prompt, seed), list(prompt.messages))
        except StopRun:
            raise
        except Exception as exc:  # the env's bug ends its episode, not the run
            return _Live(prompt_ids, seed, None, list(prompt.messages), error=f"{type(exc).__name__}: {exc}")

    def _after_turn(self, e: _Live, out: Completion, turn: int, max_tokens: int) -> bool:
        """Append the sampled turn, then the env's reply if the episode goes on; False once it stopped."""
        e.ids += out.token_ids
        e.logprobs += out.logprobs
        e.mask += [1] * len(out.token_ids)
        e.finish_reason = out.finish_reason
        text = self.template.tokenizer.decode(out.token_ids, skip_special_tokens=True)  # the ids', tags included
        e.conversation.append({"role": "assistant", "content": text})
        if e.error is not None:
            return self._stop(e, "error")
        if out.finish_reason == "length":
            return self._stop(e, "budget" if e.cap < max_tokens else "length")
        try:
            reply = e.episode.step(text)
        except StopRun:
            raise
        except Exception as exc:
            e.error = f"{type(exc).__name__}: {exc}"
            return self._stop(e, "error")
        if reply.done:
            return self._stop(e, "eos")
        if turn == self.max_turns:
            return self._stop(e, "max_turns")
        messages = [{**m, "content": m["content"][:self.env.max_tool_chars]} for m in reply.messages]
        ended_on_eos = bool(out.token_ids) and out.token_ids[-1] == self.template.eos_id
        env_ids = self.template.env_ids(e.conversation, messages, ended_on_eos)
        if len(e.ids) + len(env_ids) >= self.budget:  # no token left for the next turn
            return self._stop(e, "budget")
        e.ids += env_ids
        e.logprobs += [0.0] * len(env_ids)
        e.mask += [0] * len(env_ids)
        e.conversation += messages
        e.tool_calls += reply.info.get("tool_calls", 0)
        e.tool_errors += reply.info.get("tool_errors", 0)
        return True

    @staticmethod
    def _stop(e: _Live, reason: str) -> bool:
        e.stop = reason
        return False

    def _completion(self, e: _Live) -> Completion:
        mask = [0] * len(e.ids) if e.stop == "error" else e.mask  # an env error trains on nothing
        decode = self.template.tokenizer.decode
        spans = [(decode([t for t, _ in run]), sampled) for sampled, run in groupby(zip(e.ids, mask), key=lambda x: x[1])]
        dialogue = Dialogue(e.conversation[e.prompt_messages:], e.stop, e.tool_calls, e.tool_errors, e.error, spans)
        return Completion(e.ids, e.logprobs, self.template.tokenizer.decode(e.ids), e.finish_reason, mask, dialogue)

    def score(self, prompts: list[Prompt], groups: list[list[Completion]]) -> Scores:
        """The env's scores of the episodes' dialogues; an episode the env raised in scores None."""
        scores = self.env.score(prompts, [[c.dialogue.messages for c in group] for group in groups])
        return [[{name: None for name in s} if c.dialogue.stop == "error" else s for s, c in zip(row, group)]
                for row, group in zip(scores, groups)]


def build_turns(env: Env, tokenizer, encode_chat: Callable[[list[dict]], list[int]], model_name: str,
                rollout_cfg) -> Turns:
    """`Episodes` for a multi-turn env (its template checked here, at start), `OneTurn` otherwise."""
    if not is_multi_turn(env):
        return OneTurn(env, encode_chat)
    if rollout_cfg.max_total_tokens is not None and rollout_cfg.max_total_tokens < rollout_cfg.max_tokens:
        raise ValueError(f"rollout.max_total_tokens={rollout_cfg.max_total_tokens} < rollout.max_tokens="
                         f"{rollout_cfg.max_tokens}: the episode budget must hold at least the first turn")
    template = ChatTemplate(tokenizer, model_name, env.tools)
    return Episodes(env, template, rollout_cfg.max_turns, rollout_cfg.max_total_tokens)
