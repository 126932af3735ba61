"""The tiny model is real: transformers loads it, its tokenizer round-trips, vLLM constraints hold."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from grpo.tiny_model import TinySpec


def test_tiny_model_loads_and_meets_vllm_cpu_constraints(tiny_model_path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    assert config.model_type == "qwen2"
    assert config.hidden_size // config.num_attention_heads >= 64  # vLLM CPU attention needs head_dim >= 64
    assert (Path(tiny_model_path) / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert sum(p.numel() for p in model.parameters()) > 100_000


def test_tokenizer_round_trips_env_text_and_has_chat_template(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    text = "Natalia sold 48/2 = 24 clips in May. #### 72"
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok(text).input_ids) < 0.75 * len(text)  # BPE merges learned from the corpus (44 bytes -> 30)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Count on from 3:"}],
                                       add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nCount on from 3:<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_spec_key_is_deterministic_and_recorded(tiny_model_path):
    spec = json.loads((Path(tiny_model_path) / "tiny_spec.json").read_text())
    assert TinySpec(**spec).key() in Path(tiny_model_path).name
    assert TinySpec(hidden_size=256).key() != TinySpec().key()
