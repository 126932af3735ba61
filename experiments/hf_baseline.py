"""The baseline vLLM is measured against: HF `generate` on the same model, prompts and sampling.

Both sides count the tokens they actually generated (EOS included), so tokens/s compare even
when some completions stop early.
"""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def hf_generate(model, prompt_ids: list[list[int]], n: int, max_tokens: int, temperature: float,
                top_p: float, pad_id: int, eos_id: int) -> tuple[float, int]:
    """One batched sampling call, n completions per prompt: (seconds, generated tokens)."""
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids])  # left-padded [P, L]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    t = time.perf_counter()
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_tokens,
                         num_return_sequences=n, pad_token_id=pad_id, eos_token_id=eos_id)
    seconds = time.perf_counter() - t
    return seconds, generated_tokens(out[:, width:], eos_id)


def generated_tokens(completions: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including the first EOS of each row of [P*n, T] (the rest is padding)."""
    is_eos = completions == eos_id
    stopped = is_eos.any(-1)
    first_eos = is_eos.int().argmax(-1)
    lengths = torch.where(stopped, first_eos + 1, torch.full_like(first_eos, completions.shape[1]))
    return int(lengths.sum())
