"""A tiny Qwen2 model built locally, so tests and the default run need no model hub.

Everything is real: a byte-level BPE tokenizer trained on the envs' own text, a Qwen2 config
with head_dim 64 (vLLM's CPU attention needs head_dim >= 64), random weights from a fixed seed,
safetensors on disk, and a Qwen-style chat template. transformers, vLLM and PEFT load it like
any hub checkpoint. The build is deterministic and cached by a hash of its spec.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from runtime.model_cache import built_once


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LATER_FIELDS = ("split_digits",)  # TinySpec fields that enter its cache key only when set
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


@dataclass
class TinySpec:
    """Shape of the tiny model (`model=tiny`, `model.tiny.*`); every field goes into the cache key.
    The defaults are the default run's model: a 2-layer, 128-wide Qwen2 with a 512-token BPE."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    # Untied, with a wider lm_head init (lm_head_std), so LoRA, which cannot touch lm_head, learns
    # too; model.tiny.tie_word_embeddings=true gives the tied layout of Qwen2.5-0.5B.
    tie_word_embeddings: bool = False
    # Std of an untied lm_head. At HF's 0.02 the logits of a random 128-wide model span only about
    # +-2.5 (|w_i| * sqrt(hidden) after the final RMSNorm), so an adapter that cannot touch
    # lm_head/norm can never concentrate probability: LoRA would plateau near chance.
    lm_head_std: float = 0.1
    seed: int = 0
    # One token per digit (as Qwen2's own tokenizer splits numbers): arithmetic then has a digit
    # alphabet to compute with instead of a token per number seen in the corpus.
    split_digits: bool = False
    # Env configs whose corpus() trains the tokenizer: the model then speaks the envs' language
    # (GSM8K from the repository's data/gsm8k, from any cwd).
    tokenizer_corpus: list[Any] = field(default_factory=lambda: [{"_target_": "envs.synthetic.DigitsEnv"},
                                                                 {"_target_": "envs.gsm8k.GSM8KEnv"}])

    def key(self) -> str:
        fields = asdict(self)
        for name in LATER_FIELDS:  # off, a field added later leaves the key (and the cached models) as before
            if not fields[name]:
                del fields[name]
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _corpus(spec: TinySpec) -> tuple[Iterable[str], list[str]]:
    """(the corpus envs' text, the tokens they need whole: a multi-turn env's tool tags, its
    `vocabulary`, e.g. `<calc>` `</calc>`)."""
    from hydra.utils import instantiate

    vocabulary = []
    for env_cfg in spec.tokenizer_corpus:
        env = instantiate(env_cfg)
        vocabulary += [t for t in getattr(env, "vocabulary", ()) if t not in vocabulary]
        env.close()

    def text() -> Iterable[str]:
        for env_cfg in spec.tokenizer_corpus:
            env = instantiate(env_cfg)
            try:
                yield from env.corpus()
            finally:
                env.close()

    return text(), vocabulary


def _train_tokenizer(spec: TinySpec, out: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus, vocabulary = _corpus(spec)
    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if spec.split_digits else byte_level
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(vocabulary),  # the tags take the last ids; no env has any: as before
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    # Whole tokens that decode as text (not special: vLLM's detokenizer keeps them in the text).
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in vocabulary])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def _build(spec: TinySpec, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = _train_tokenizer(spec, out)
    config = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        dtype="float32",
    )
    if len(tok) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens > model.tiny.vocab_size={spec.vocab_size}")
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    if not spec.tie_word_embeddings:
        torch.nn.init.normal_(model.lm_head.weight, std=spec.lm_head_std)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2, default=str))


def build_tiny_model(spec: TinySpec, cache_dir: str | Path | None = None) -> Path:
    """Return the directory of the tiny model for `spec`, building it once (process-safe)."""
    return built_once(f"tiny-qwen2-{spec.key()}", lambda out: _build(spec, out), cache_dir)
