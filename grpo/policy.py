"""The trainer's model: load it, compute per-token logprobs on vLLM's exact token ids.

Position ids come from the attention mask, so a left-padded row sees positions 0.. from its first
real token, as vLLM does; otherwise trainer and vLLM logprobs would disagree.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from grpo.batch import Batch
from grpo.packing import pack, packed_inputs, unpack, use_packed_attention
from grpo.precision import Precision
from grpo.token_scores import gathered_logprobs, head_scores, token_entropy, token_scores  # noqa: F401 (gathered_logprobs, token_entropy: this module's API too)

# save_pretrained/from_pretrained draw a progress bar per call: noise in a one-line-per-step log.
hf_logging.disable_progress_bar()

def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """Float logits [B, C, V] / temperature of the positions that predict the completion tokens of
    input_ids [B, P+C], prompt_len = P: position P-1+i predicts token P+i.

    The LM head runs on those C positions only (`logits_to_keep`), not on the prompt: with a 152k
    vocabulary that is most of the head's FLOPs and memory. `use_cache=False`: a scoring forward
    has no next token to decode, and the config's default would build a KV cache every call."""
    completion_len = input_ids.shape[1] - prompt_len
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=padded_positions(attention_mask),
                   logits_to_keep=completion_len + 1, use_cache=False).logits
    return logits[:, :-1].float() / temperature


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] position ids of left-padded rows: 0.. from each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def completion_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0, packed: bool = False, chunk: Optional[int] = None,
                      entropy: Optional[str] = "metric") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(logprob [B, C], entropy [B, C] or None) of the completion tokens of input_ids [B, P+C]
    (grpo/token_scores.py; `entropy` one of its ENTROPY_MODES).

    `packed`: the forward runs on the rows laid end to end without padding (grpo/packing.py), and
    padding positions of the result are 0. `chunk`: the LM head runs on the last hidden states,
    `chunk` completion positions at a time, never holding all [B*C, V] logits; None: one forward
    through the model's own head, which keeps only the completion positions (`logits_to_keep`)."""
    rows, completion_len = input_ids.shape[0], input_ids.shape[1] - prompt_len
    if packed:
        layout = pack(input_ids, attention_mask, prompt_len)
        inputs = packed_inputs(model, layout)  # attention within each row (grpo/packing.py)
        targets = layout.targets
    else:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "position_ids": padded_positions(attention_mask)}
        targets = input_ids[:, prompt_len:].reshape(-1)
    if chunk is None:
        if packed:
            logits = model(**inputs, logits_to_keep=layout.predict, use_cache=False).logits[0].float() / temperature
        else:
            logits = completion_logits(model, input_ids, attention_mask, prompt_len, temperature)
            logits = logits.reshape(-1, logits.shape[-1])  # a view: no copy of [B, C, V]
        logp, ent = token_scores(logits, targets, entropy)
    else:
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        hidden = hidden[0, layout.predict] if packed else \
            hidden[:, prompt_len - 1:prompt_len - 1 + completion_len].reshape(-1, hidden.shape[-1])
        logp, ent = head_scores(model.get_output_embeddings(), hidden, targets, temperature, chunk, entropy)
    if packed:
        shape = (rows, completion_len)
        return unpack(logp, layout, shape), unpack(ent, layout, shape) if ent is not None else None
    return logp.view(rows, completion_len), ent.view(rows, completion_len) if ent is not None else None


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   temperature: float = 1.0, packed: bool = False, chunk: Optional[int] = None) -> torch.Tensor:
    """Logprob of each completion token: [B, C] for input_ids [B, P+C], prompt_len = P."""
    return completion_scores(model, input_ids, attention_mask, prompt_len, temperature, packed, chunk, entropy=None)[0]


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt token ids of chat `messages`: the tokenizer's chat template, generation prompt added."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def wrap_lora(model, lora):
    """PEFT LoRA on `lora.target_modules`; only the adapter trains. Checked first so a typo in a
    module name or a rank the server cannot hold fails at start, by name."""
    from peft import LoraConfig, get_peft_model

    if lora.r > lora.max_lora_rank:
        raise ValueError(f"finetune.lora.r={lora.r} exceeds the vLLM server's --max-lora-rank "
                         f"(finetune.lora.max_lora_rank={lora.max_lora_rank})")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"finetune.lora.target_modules: {missing} not in the model; linear modules are {linear}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class Policy:
    """HF causal LM (optionally PEFT-wrapped) plus what the loss needs from it."""

    def __init__(self, path: str | Path, precision: Precision = Precision(), device: str = "cpu",
                 gradient_checkpointing: bool = False, temperature: float = 1.0, lora=None,
                 model: Optional[torch.nn.Module] = None, compile: bool = False,
                 logprob_chunk_tokens: Optional[int] = None):
        self.path = str(path)
        self.device = torch.device(device)
        self.precision = precision
        self.temperature = temperature
        self.logprob_chunk_tokens = logprob_chunk_tokens  # train.logprob_chunk_tokens (grpo/token_scores.py)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        # `model`: already built where it must live (sync=shared: views of vLLM's weights). The
        # trainer holds the master weights (fp32 by default), whatever dtype vLLM serves.
        self.model = model if model is not None else \
            AutoModelForCausalLM.from_pretrained(self.path, dtype=precision.master).to(self.device)
        use_packed_attention(self.model)  # sdpa, and packed micro-batches' rows kept apart
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.lora = lora
        if lora is not None:
            self.model = wrap_lora(self.model, lora)
        self.compiled = False
        if compile:
            self.compile()
        self.model.train()
        self.reference = None  # frozen copy, loaded only when beta > 0 (never with LoRA)

    def compile(self) -> None:
        """torch.compile the decoder (inductor, dynamic shapes) in place: parameter names (what the
        bridges and checkpoints key on) stay the same, and both the model's own forward and the
        chunked head's hidden states (grpo/token_scores.py) go through it; the head stays eager."""
        if not self.compiled:
            self.base_model.get_decoder().compile(dynamic=True)
            self.compiled = True

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers model (under the PEFT wrapper with LoRA): what full checkpoints save."""
        return self.model.get_base_model() if self.lora is not None else self.model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def compute_context(self):
        """Where training-time forwards run (autocast to the compute dtype, if narrower than the
        master weights). The probe does not use it: it checks vLLM at the served precision."""
        return self.precision.compute_context(self.device)

    def scores(self, batch: Batch, model=None, entropy: Optional[str] = None) \
            -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`completion_scores` of `batch` by `model` (default: the policy), packed if the batch
        is, with the policy's temperature and logprob chunk, under the compute context."""
        with self.compute_context():
            return completion_scores(model if model is not None else self.model, batch.input_ids.to(self.device),
                                     batch.attention_mask.to(self.device), batch.prompt_len, self.temperature,
                                     batch.packed, self.logprob_chunk_tokens, entropy)

    def logprobs(self, batch: Batch) -> torch.Tensor:
        return self.scores(batch)[0]

    def logprobs_and_entropy(self, batch: Batch, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`logprobs(batch)` [B, C] plus the entropy [B, C] of the distribution each token was
        sampled from, at the rollout temperature, from the same forward's logits: a metric (no
        grad, chunked, fp32), or with `grad` a term the loss trains on (the entropy bonus)."""
        return self.scores(batch, entropy="grad" if grad else "metric")

    def load_reference(self) -> None:
        """A frozen copy of the initial weights for the KL term; with LoRA the base model,
        adapter disabled, is the reference, so no second model is loaded."""
        if self.lora is not None:
            return
        self.reference = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.precision.master).to(self.device)
        self.reference.eval().requires_grad_(False)
        use_packed_attention(self.reference)

    def reference_context(self):
        """Context in which `reference_model` computes reference logprobs (LoRA: adapter off)."""
        return self.model.disable_adapter() if self.lora is not None else contextlib.nullcontext()

    @property
    def reference_model(self):
        return self.model if self.lora is not None else self.reference

    def save(self, out: str | Path) -> None:
        """Full model, or with LoRA the adapter only (loadable by `PeftModel.from_pretrained`)."""
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> Optional[torch.Tensor]:
        if self.reference_model is None:
            return None
        with self.reference_context():
            return self.scores(batch, model=self.reference_model)[0]

    @torch.no_grad()
    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """Trainer logprobs of token_ids[1:] given their prefix, at temperature 1 (the probe), at
        the precision vLLM serves: the master weights as they are, or under autocast to bf16."""
        ids = torch.tensor([token_ids], device=self.device)
        with self.precision.served_context(self.device):
            out = token_logprobs(self.model, ids, torch.ones_like(ids), 1, 1.0)
        return out[0].tolist()
