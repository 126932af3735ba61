"""The tensors one GRPO step trains on, built from vLLM's groups.

Layout (TRL's): prompts left-padded to P, completions right-padded to C, so the completion
logits of every row are the slice [P-1 : P+C-1] and need no per-row gather.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, Optional

import torch

from serving.client import Completion


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, P+C] long: left-padded prompt ++ right-padded completion
    attention_mask: torch.Tensor  # [B, P+C] long
    completion_mask: torch.Tensor  # [B, C] float: 1 on sampled tokens
    sampling_logp: torch.Tensor  # [B, C] float: vLLM's logprob of each sampled token
    advantages: torch.Tensor  # [B] float: one per sequence
    prompt_len: int  # P
    old_logp: Optional[torch.Tensor] = None  # [B, C] trainer logprobs at rollout time
    ref_logp: Optional[torch.Tensor] = None  # [B, C] frozen reference (beta > 0)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def micro_batches(self, size: int) -> Iterator["Batch"]:
        for start in range(0, self.size, size):
            sl = slice(start, start + size)
            yield replace(
                self,
                **{
                    f.name: getattr(self, f.name)[sl]
                    for f in fields(self)
                    if isinstance(getattr(self, f.name), torch.Tensor)
                },
            )


def build_batch(
    prompt_ids: list[list[int]],
    groups: list[list[Completion]],
    advantages: torch.Tensor,
    pad_id: int,
) -> Batch:
    """Flatten [P prompts][n completions] into rows; `advantages` is [P, n]."""
    rows = [(p, c) for p, group in zip(prompt_ids, groups) for c in group]
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
            completion_mask[i, :n] = 1
            sampling_logp[i, :n] = torch.tensor(c.logprobs)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        sampling_logp=sampling_logp,
        advantages=advantages.reshape(-1).float(),
        prompt_len=P,
    )
