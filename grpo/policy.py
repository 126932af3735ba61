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
from grpo.precision import Precision

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
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=completion_len + 1, use_cache=False).logits
    return logits[:, :-1].float() / temperature


def gathered_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of each target [B, C], logsumexp of each position [B, C]) from logits [B, C, V]."""
    lse = logits.logsumexp(-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse, lse


# Rows of [*, V] logits the entropy works on at once: 2**24 floats (64 MB) of temporaries at most,
# whatever the vocabulary, instead of a second [B, C, V] tensor.
ENTROPY_CHUNK_ELEMENTS = 2 ** 24


@torch.no_grad()
def token_entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy in nats [B, C] of softmax(logits) [B, C, V], given lse = logits.logsumexp(-1):
    H = lse - sum_v p_v * logit_v. A logging metric: no gradient, computed in row chunks."""
    vocab = logits.shape[-1]
    flat, flat_lse = logits.detach().reshape(-1, vocab), lse.detach().reshape(-1)
    out = torch.empty_like(flat_lse)
    rows = max(1, ENTROPY_CHUNK_ELEMENTS // vocab)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        probs = (chunk - flat_lse[start:start + rows, None]).exp()
        expected = torch.bmm(probs.unsqueeze(1), chunk.unsqueeze(2)).view(-1)  # sum_v p_v * logit_v
        out[start:start + rows] = flat_lse[start:start + rows] - expected
    return out.view(lse.shape)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """Logprob of each completion token: [B, C] for input_ids [B, P+C], prompt_len = P."""
    logits = completion_logits(model, input_ids, attention_mask, prompt_len, temperature)
    return gathered_logprobs(logits, input_ids[:, prompt_len:])[0]


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
                 model: Optional[torch.nn.Module] = None, compile: bool = False):
        self.path = str(path)
        self.device = torch.device(device)
        self.precision = precision
        self.temperature = temperature
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        # `model`: already built where it must live (sync=shared: views of vLLM's weights). The
        # trainer holds the master weights (fp32 by default), whatever dtype vLLM serves.
        self.model = model if model is not None else \
            AutoModelForCausalLM.from_pretrained(self.path, dtype=precision.master).to(self.device)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.lora = lora
        if lora is not None:
            self.model = wrap_lora(self.model, lora)
        if compile:  # in place: parameter names (what the bridges and checkpoints key on) stay the same
            self.model.compile(dynamic=True)
        self.model.train()
        self.reference = None  # frozen copy, loaded only when beta > 0 (never with LoRA)

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

    def logprobs(self, batch: Batch) -> torch.Tensor:
        with self.compute_context():
            return token_logprobs(self.model, batch.input_ids.to(self.device),
                                  batch.attention_mask.to(self.device), batch.prompt_len, self.temperature)

    def logprobs_and_entropy(self, batch: Batch, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`logprobs(batch)` [B, C] plus the entropy [B, C] of the distribution each token was
        sampled from, at the rollout temperature, from the same forward's logits: a metric (no
        grad, chunked), or with `grad` a term the loss trains on (the entropy bonus)."""
        input_ids = batch.input_ids.to(self.device)
        with self.compute_context():
            logits = completion_logits(self.model, input_ids, batch.attention_mask.to(self.device),
                                       batch.prompt_len, self.temperature)
            logp, lse = gathered_logprobs(logits, input_ids[:, batch.prompt_len:])
        if grad:  # outside autocast, as below
            return logp, lse - ((logits - lse.unsqueeze(-1)).exp() * logits).sum(-1)
        return logp, token_entropy(logits, lse)  # outside autocast: its matmul stays fp32

    def load_reference(self) -> None:
        """A frozen copy of the initial weights for the KL term; with LoRA the base model,
        adapter disabled, is the reference, so no second model is loaded."""
        if self.lora is not None:
            return
        self.reference = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.precision.master).to(self.device)
        self.reference.eval().requires_grad_(False)

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
        with self.reference_context(), self.compute_context():
            return token_logprobs(self.reference_model, batch.input_ids.to(self.device),
                                  batch.attention_mask.to(self.device), batch.prompt_len, self.temperature)

    @torch.no_grad()
    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """Trainer logprobs of token_ids[1:] given their prefix, at temperature 1 (the probe), at
        the precision vLLM serves: the master weights as they are, or under autocast to bf16."""
        ids = torch.tensor([token_ids], device=self.device)
        with self.precision.served_context(self.device):
            out = token_logprobs(self.model, ids, torch.ones_like(ids), 1, 1.0)
        return out[0].tolist()
