"""`env=atropos env.api_url=http://host:8000`: the trainer as an Atropos trainer. Environments run
as their own processes (any `atroposlib` BaseEnv; ours: envs/atropos_digits.py), generate from our
vLLM server (its `/generate`: serving/atropos_generate.py) and push scored groups to Atropos'
`run-api`; the trainer registers (`POST /register`) and pulls each step's batch (`GET /batch`).

The step's input then arrives generated and scored, so this env brings its own rollout source
(`AtroposRollouts`, what the Run holds instead of the Sampler): a batch of ScoredData groups becomes
a `Rollout` of P = train.prompts_per_step groups of G = train.group_size completions:
- `tokens` / `masks`: the prompt is everything before the first trained position (mask != -100),
  the completion the rest; a group shares its prompt;
- `scores` are the rewards (one component, `score`); advantages are our estimator over each group
  (`advantage=group`: (score - mean) / std, as Atropos' example trainer does), and a sample whose
  `overrides` say `set_advantage_to_zero` gets advantage 0;
- `inference_logprobs` are the sampling logprobs the IS correction uses; a group without them gets
  the trainer's own logprobs at the start of the step (IS ratio 1; metric `atropos_own_logprobs`).
Every batch is checked: a group size other than train.group_size, a completion longer than
rollout.max_tokens or a sequence longer than env.max_token_len stops the run at that batch, naming
the key and the value. While no batch comes (no env registered, or its process died) the trainer
waits, saying so every `wait_message_s`, and goes on when an env pushes again.

Staleness: Atropos samples carry no weight version. The API's step (`/status` `current_step`, one
per batch handed out) is the trainer's step, and each env pauses when `max_batches_offpolicy`
batches wait in the queue: a batch trained at step s was generated on weights of step s - 1 -
max_batches_offpolicy or newer (plus the groups in flight when the env paused). So in this mode
that env option is the bound `train.max_staleness` is elsewhere; the trainer itself pulls
synchronously (train.max_staleness must be 0).
"""

from __future__ import annotations

import sys
import time
from typing import Iterator, Mapping, Optional

import requests
import torch

from grpo.batch import Rollout, build_batch
from grpo.data import Completion, Prompt, RewardWeights, Scores

IGNORED = -100  # Atropos' mask value for a token not trained on


class AtroposError(ValueError):
    """A batch this trainer cannot train on as configured (group size, lengths, masks)."""


class AtroposEnv:
    """Registration with the run-api, and the rollout source built on it."""

    def __init__(self, api_url: str, group_size: int, prompts_per_step: int, num_steps: int, max_tokens: int = 16,
                 rollout_max_tokens: Optional[int] = None, max_token_len: int = 2048, max_staleness: int = 0,
                 poll_s: float = 0.5, wait_message_s: float = 60.0, timeout_s: float = 30.0,
                 reward_weights: Optional[Mapping] = None):
        if max_staleness:
            raise ValueError(f"train.max_staleness={max_staleness}: with env=atropos the trainer pulls each batch "
                             "when it needs it; bound staleness with the env's max_batches_offpolicy")
        self.api_url, self.group_size, self.prompts, self.max_tokens = api_url.rstrip("/"), group_size, \
            prompts_per_step, max_tokens
        self.limit = rollout_max_tokens or max_tokens  # what a completion may hold: the loss's length
        self.max_token_len, self.poll_s, self.wait_message_s, self.timeout_s = max_token_len, poll_s, wait_message_s, \
            timeout_s
        self.reward_weights = RewardWeights({"score": 1.0}, reward_weights)
        self.session = requests.Session()
        try:
            self.uuid = self.session.post(f"{self.api_url}/register", timeout=timeout_s, json={
                "wandb_group": "", "wandb_project": "", "batch_size": prompts_per_step * group_size,
                "max_token_len": max_token_len, "checkpoint_dir": "", "save_checkpoint_interval": 0,
                "starting_step": 0, "num_steps": num_steps}).json()["uuid"]
        except (requests.RequestException, ValueError, KeyError) as exc:
            raise ValueError(f"env.api_url={api_url}: no Atropos run-api answers POST /register there ({exc}); "
                             "start one with `run-api --port <port>` (pip install -e '.[atropos]')") from exc
        self.pulled = 0

    def rollouts(self, policy, client) -> "AtroposRollouts":
        return AtroposRollouts(self, policy, client)

    def next_batch(self) -> list[dict]:
        """The next batch of scored groups, waiting (and saying so) while the API has none."""
        began = said = time.monotonic()
        while True:
            try:
                batch = self.session.get(f"{self.api_url}/batch", timeout=self.timeout_s).json().get("batch")
            except (requests.RequestException, ValueError) as exc:
                batch, why = None, f"the run-api does not answer ({type(exc).__name__})"
            else:
                why = "no env has pushed a whole batch"
            if batch:
                self.pulled += 1
                return batch
            if time.monotonic() - said >= self.wait_message_s:
                said = time.monotonic()
                print(f"env=atropos: no batch from {self.api_url} for {said - began:.0f} s: {why}. Is an env "
                      "process running and registered with this run-api (e.g. python -m envs.atropos_digits)? "
                      "Waiting.", file=sys.stderr, flush=True)
            time.sleep(self.poll_s)

    def eval_prompts(self, split: str, n: int) -> list[Prompt]:
        raise ValueError(f"eval.enabled=true (eval.split={split!r}): env=atropos has no held-out prompts of its "
                         "own (Atropos envs run their own evaluate()); set eval.enabled=false")

    def sample(self, n: int) -> list[Prompt]:
        raise TypeError("env=atropos brings its rollouts (AtroposEnv.rollouts), it has no prompts to sample")

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> Scores:
        raise TypeError("env=atropos: the Atropos env scored the completions already")

    def success(self, components: Mapping[str, Optional[float]]) -> bool:
        return components["score"] == 1.0

    def corpus(self) -> Iterator[str]:
        return iter(())

    def state_dict(self) -> dict:
        return {"pulled": self.pulled}  # the queue is the run-api's: a resume trains on what it holds next

    def load_state_dict(self, state: dict) -> None:
        self.pulled = state["pulled"]

    def close(self) -> None:
        self.session.close()


class AtroposRollouts:
    """The Run's rollout source in Atropos mode: `(step) -> (Rollout, phase seconds)`, as Sampler is."""

    def __init__(self, env: AtroposEnv, policy, client):
        self.env, self.policy, self.client = env, policy, client

    def __call__(self, step: int) -> tuple[Rollout, dict]:
        began = time.perf_counter()
        # the envs' /generate samples from what our rollouts would (the LoRA adapter, if served as one)
        self.client.server.post("/atropos/generate_model", {"model": self.client.model})
        batch = self.env.next_batch()
        pulled = time.perf_counter()
        rollout, own = convert(batch, self.env.group_size, self.env.prompts, self.env.limit,
                               self.env.max_token_len, self.policy.tokenizer)
        if own:
            self.own_logprobs(rollout)
        converted = time.perf_counter()
        rollout.sampling["atropos_own_logprobs"] = int(own)
        # generation happened in the env: the step waited `time_pull` for it (also its time_generate)
        return rollout, {"time_generate": pulled - began, "time_score": 0.0, "time_pull": pulled - began,
                         "time_convert": converted - pulled}

    @torch.no_grad()
    def own_logprobs(self, rollout: Rollout) -> None:
        """No inference_logprobs: the trainer's logprobs now, before the step's update, stand in."""
        batch = build_batch(rollout, torch.zeros(rollout.rewards.shape), self.policy.pad_id)
        logp = self.policy.logprobs(batch).float().cpu()
        for row, c in enumerate(c for group in rollout.groups for c in group):
            c.logprobs = logp[row, :len(c.token_ids)].tolist()


def convert(batch: list[dict], group_size: int, prompts: int, max_tokens: int, max_token_len: int,
            tokenizer) -> tuple[Rollout, bool]:
    """A pulled batch as a scored Rollout [P, G], and whether it lacked inference_logprobs."""
    for g in batch:  # first: a wrong group size is why a batch holds another number of groups
        if len(g["tokens"]) != group_size:
            raise AtroposError(f"train.group_size={group_size}: an Atropos group (env_id {g.get('env_id')}) has "
                               f"{len(g['tokens'])} sequences; run the env with the same group size")
    if len(batch) != prompts:
        raise AtroposError(f"train.prompts_per_step={prompts}: the Atropos batch holds {len(batch)} groups "
                           f"({sum(len(g['tokens']) for g in batch)} sequences)")
    out_prompts, prompt_ids, groups, scores, zero, own = [], [], [], [], [], False
    for g in batch:
        logprobs = g.get("inference_logprobs")
        own |= not logprobs
        overrides = g.get("overrides") or [{}] * group_size
        group, prompt = [], None
        for i, (tokens, mask) in enumerate(zip(g["tokens"], g["masks"])):
            if len(tokens) > max_token_len:
                raise AtroposError(f"env.max_token_len={max_token_len}: an Atropos sequence has {len(tokens)} tokens")
            first = next((k for k, m in enumerate(mask) if m != IGNORED), len(mask))
            if any(m == IGNORED for m in mask[first:]):
                raise AtroposError("an Atropos sequence has untrained tokens (-100) after trained ones (multi-turn "
                                   "masks): not supported by env=atropos yet")
            if prompt is None:
                prompt = tokens[:first]
            elif tokens[:first] != prompt:
                raise AtroposError(f"an Atropos group (env_id {g.get('env_id')}) holds different prompts")
            ids = tokens[first:]
            if len(ids) > max_tokens:
                raise AtroposError(f"rollout.max_tokens={max_tokens}: an Atropos completion has {len(ids)} tokens; "
                                   "give the env and the trainer the same max tokens")
            lps = logprobs[i][first:] if logprobs else [0.0] * len(ids)
            finish = "stop" if ids and ids[-1] == tokenizer.eos_token_id else "length"
            group.append(Completion(list(ids), [float(x) for x in lps], tokenizer.decode(ids), finish))
        zero.append([bool((o or {}).get("set_advantage_to_zero")) for o in overrides])
        out_prompts.append(Prompt([{"role": "user", "content": tokenizer.decode(prompt)}], "",
                                  {"env": f"atropos_{g.get('env_id')}"}))
        prompt_ids.append(prompt)
        groups.append(group)
        scores.append([{"score": float(s)} for s in g["scores"]])
    rollout = Rollout(out_prompts, prompt_ids, groups)
    rollout.set_scores(scores, RewardWeights({"score": 1.0}))
    rollout.zero_advantage = torch.tensor(zero)
    return rollout, own
