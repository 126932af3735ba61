"""The tiny model is real: transformers loads it, its tokenizer round-trips, vLLM constraints hold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from runtime.tiny_model import TinySpec, _train_tokenizer


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


# sha256 of the default tiny model's tokenizer.json: trained on Digits + the repository's GSM8K in
# this order. README's default-run rewards (0.086 -> 0.29 -> 0.90 -> 0.99) are this tokenizer's.
TOKENIZER_SHA256 = "3e3f96849cf9093b2811d1987e1d3a5a0c3d829876491880edc9ec2aa8f7efb5"


def test_tokenizer_is_built_from_the_repository_alone(tiny_model_path, tmp_path, monkeypatch):
    """From a cwd outside the repo, the default spec (which names no path) trains the very
    tokenizer the cached model has: nothing beside the clone is read, the cache key holds no path."""
    spec = json.loads((Path(tiny_model_path) / "tiny_spec.json").read_text())
    assert spec["tokenizer_corpus"] == [{"_target_": "envs.synthetic.DigitsEnv"}, {"_target_": "envs.gsm8k.GSM8KEnv"}]
    monkeypatch.chdir(tmp_path)
    _train_tokenizer(TinySpec(**spec), tmp_path / "tok")
    built = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert built == (Path(tiny_model_path) / "tokenizer.json").read_bytes()
    assert hashlib.sha256(built).hexdigest() == TOKENIZER_SHA256
