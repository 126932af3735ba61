"""The HF baseline counts generated tokens as vLLM does: up to and including the first EOS."""

from __future__ import annotations

import torch

from experiments.hf_baseline import generated_tokens


def test_tokens_stop_at_first_eos_and_count_it():
    eos, pad = 9, 0
    completions = torch.tensor([
        [5, 6, 7, 8],      # no EOS: 4
        [5, eos, pad, pad],  # 2
        [eos, pad, pad, pad],  # 1
        [5, 6, eos, eos],  # 3 (HF pads finished rows with EOS when pad == eos)
    ])
    assert generated_tokens(completions, eos) == 4 + 2 + 1 + 3
