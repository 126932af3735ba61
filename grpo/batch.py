"""What one GRPO step works on: the `Rollout` (prompts, vLLM's groups, rewards), and the `Batch`
of tensors the loss trains on, built from it.

Layout (TRL's): prompts left-padded to P, completions right-padded to C, so the completion
logits of every row are the slice [P-1 : P+C-1] and need no per-row gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterator, Optional

import torch

from grpo.advantages import reward_tensor
from grpo.data import STOP_REASONS, Completion, Prompt, RewardWeights, Scores


@dataclass
class Rollout:
    """One step's samples: P prompts, G completions each, exactly as vLLM returned them."""

    prompts: list[Prompt]  # [P]
    prompt_ids: list[list[int]]  # [P][prompt tokens]: chat template applied, what vLLM was sent
    groups: list[list[Completion]]  # [P][G]: sampled token ids + vLLM's logprob of each
    rewards: Optional[torch.Tensor] = None  # [P, G] float32 once scored; NaN where the env gave none
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [P, G], NaN where not given
    sampling: dict = field(default_factory=dict)  # how its groups were drawn (dynamic sampling's metrics)
    zero_advantage: Optional[torch.Tensor] = None  # [P, G] bool: advantage forced to 0 (Atropos' overrides)

    def select(self, rows: list[int]) -> "Rollout":
        """These prompts' groups (scores included)."""
        pick = torch.tensor(rows, dtype=torch.long)
        return replace(self, prompts=[self.prompts[i] for i in rows], prompt_ids=[self.prompt_ids[i] for i in rows],
                       groups=[self.groups[i] for i in rows], rewards=self.rewards[pick],
                       components={name: values[pick] for name, values in self.components.items()})

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """The groups of `parts`, in order, as one scored rollout."""
        return Rollout(prompts=[p for r in parts for p in r.prompts], prompt_ids=[p for r in parts for p in r.prompt_ids],
                       groups=[g for r in parts for g in r.groups], rewards=torch.cat([r.rewards for r in parts]),
                       components={name: torch.cat([r.components[name] for r in parts]) for name in parts[0].components})

    @property
    def texts(self) -> list[list[str]]:  # [P][G]
        return [[c.text for c in group] for group in self.groups]

    def set_scores(self, scores: Scores, weights: RewardWeights) -> None:
        """The env's scores as one [P, G] tensor per component, and `rewards` their weighted sum."""
        self.components = {name: reward_tensor([[s[name] for s in group] for group in scores])
                           for name in weights.names}
        self.rewards = weights.total(self.components)

    def reward_metrics(self) -> dict:
        """Mean and std over the rewards the env gave; `reward_nan` counts those it could not;
        `reward/<name>` the mean of each component (over the values given)."""
        given = self.rewards[~self.rewards.isnan()]
        return {"reward_mean": given.mean().item(), "reward_std": given.std().item(),
                "reward_nan": self.rewards.numel() - given.numel(),
                **{f"reward/{name}": values.nanmean().item() for name, values in self.components.items()},
                **self.env_reward_metrics()}

    def env_reward_metrics(self) -> dict:
        """`reward_env/<name>`: the mean reward of each env's prompts, when several envs feed the
        run (their prompts carry meta["env"], envs/remote.py)."""
        names = sorted({p.meta["env"] for p in self.prompts if "env" in p.meta})
        return {f"reward_env/{name}": self.rewards[torch.tensor([p.meta.get("env") == name for p in self.prompts])]
                .nanmean().item() for name in names}

    def completion_metrics(self) -> dict:
        """What the completions look like and how much signal the step has: token lengths, the
        fraction cut at max_tokens (`truncated_frac`), and the fraction of groups whose given
        rewards all tie (`tied_group_frac`: advantage 0 for every sample, nothing to learn)."""
        completions = [c for group in self.groups for c in group]
        lengths = torch.tensor([sum(c.sampled_mask) for c in completions], dtype=torch.float32)  # env ids not counted
        truncated = [c.finish_reason == "length" for c in completions]
        tied = tied_groups(self.rewards)
        return {"completion_len_min": lengths.min().item(), "completion_len_mean": lengths.mean().item(),
                "completion_len_max": lengths.max().item(), "truncated_frac": sum(truncated) / len(truncated),
                "tied_group_frac": tied.float().mean().item(), **episode_metrics(completions)}


def episode_metrics(completions: list[Completion]) -> dict:
    """Multi-turn episodes' shape (none for single-turn rollouts): assistant turns and env tokens
    per episode, tool calls and tool errors per episode, and the fraction stopped by each rule."""
    dialogues = [c.dialogue for c in completions if c.dialogue is not None]
    if not dialogues:
        return {}
    n = len(dialogues)
    env_tokens = sum(len(c.token_ids) - sum(c.sampled_mask) for c in completions if c.dialogue is not None)
    return {"turns_mean": sum(d.turns for d in dialogues) / n, "env_tokens_mean": env_tokens / n,
            "tool_calls": sum(d.tool_calls for d in dialogues) / n, "tool_errors": sum(d.tool_errors for d in dialogues) / n,
            **{f"stop/{reason}": sum(d.stop == reason for d in dialogues) / n for reason in STOP_REASONS}}


def tied_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool from rewards [P, G]: the groups whose given rewards all tie (advantage 0 for every
    sample under a group baseline: nothing to learn); one or no reward is no comparison either."""
    given = ~rewards.isnan()
    high = rewards.masked_fill(~given, -torch.inf).amax(dim=1)
    low = rewards.masked_fill(~given, torch.inf).amin(dim=1)
    return (given.sum(dim=1) < 2) | (high == low)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, P+C] long: left-padded prompt ++ right-padded completion
    attention_mask: torch.Tensor  # [B, P+C] long
    completion_mask: torch.Tensor  # [B, C] float: 1 on sampled tokens, 0 on padding and env tokens (multi-turn)
    sampling_logp: torch.Tensor  # [B, C] float: vLLM's logprob of each sampled token
    advantages: torch.Tensor  # [B] float: one per sequence
    prompt_len: int  # P
    old_logp: Optional[torch.Tensor] = None  # [B, C] trainer logprobs at rollout time
    ref_logp: Optional[torch.Tensor] = None  # [B, C] frozen reference (beta > 0)
    # Forward its rows packed end to end without padding (a token-budget micro-batch, grpo/packing.py);
    # outputs keep this padded [B, C] layout either way.
    packed: bool = False

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, sl: slice) -> "Batch":
        """These rows of every tensor (a micro-batch, or a trainer process's share of the step)."""
        return replace(self, **{f.name: getattr(self, f.name)[sl] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def micro_batches(self, size: int) -> Iterator["Batch"]:
        for start in range(0, self.size, size):
            yield self.rows(slice(start, start + size))


def build_batch(rollout: Rollout, advantages: torch.Tensor, pad_id: int) -> Batch:
    """Flatten the rollout's [P prompts][G completions] into B = P*G rows; `advantages` is [P, G]."""
    rows = [(p, c) for p, group in zip(rollout.prompt_ids, rollout.groups) for c in group]
    P = max(len(p) for p, _ in rows)
    C = max(max(len(c.token_ids) for _, c in rows), 1)
    B = len(rows)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + C), dtype=torch.long)
    completion_mask = torch.zeros((B, C))
    sampling_logp = torch.zeros((B, C))
    for i, (p, c) in enumerate(rows):
        n = len(c.token_ids)
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        attention_mask[i, P - len(p) : P + n] = 1
        if n:
            input_ids[i, P : P + n] = torch.tensor(c.token_ids)
            completion_mask[i, :n] = torch.tensor(c.sampled_mask, dtype=completion_mask.dtype)
            sampling_logp[i, :n] = torch.tensor(c.logprobs)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        sampling_logp=sampling_logp,
        advantages=advantages.reshape(-1).float(),
        prompt_len=P,
    )
