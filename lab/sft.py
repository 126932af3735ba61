"""Supervised warm start: fine-tune a model on an env's reference answers, so GRPO starts from a
model that is sometimes right (a random model never is, and GRPO learns nothing from groups whose
rewards all tie).

    python -m lab.sft env=arith                      # the tiny model (model=tiny) on small arithmetic
    python -m lab.sft env=arith sft.steps=600 sft.lr=1e-3
    python train.py model=tiny_arith env=arith       # GRPO from the cached warm start (built on first use)

Each step draws `sft.batch_size` training prompts from the env, appends the env's reference answer
as it grades it (`Env.reference`: `<answer>42</answer>`) and EOS, and minimises the cross-entropy of
the answer tokens only (grpo/sft.py, the same Policy, chat encoding and precision as GRPO). The run
dir gets the resolved config (`config.yaml`; Hydra's own in .hydra/), `metrics.jsonl` (loss, token accuracy, lr per step),
`eval.jsonl` and `eval_samples.jsonl` (held-out greedy pass@1 before and after, HF greedy decoding
scored by the env) and `final/`, an HF model dir that `model.path=<run dir>/final` loads and vLLM
serves.

`model.warm_start` (conf/model/tiny_arith.yaml) names such a run as a model: `warm_start()` builds
it once into `.cache/models/sft-<key>/` (the key a hash of the base model, the SFT settings, the
env and the compute dtype), under a file lock as the tiny model is, so tests and default commands
reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from envs.base import Env, references
from grpo.data import Prompt
from grpo.policy import Policy, encode_chat
from grpo.precision import Precision, dtype_name
from grpo.schedule import warmup_schedule
from grpo.sft import answer_batch, answer_loss
from lab import final
from lab.evaluate import append_jsonl
from runtime.config import SFTConfig, register_configs, validate
from runtime.model_cache import built_once


@torch.no_grad()
def greedy_pass_at_1(model, tokenizer, env: Env, prompts: list[Prompt], max_tokens: int, context=None,
                     batch_size: int = 64) -> tuple[float, list[dict]]:
    """Share of `prompts` whose greedy completion (HF generate under `context`, e.g. the precision
    vLLM would serve) the env counts a success; and one row per prompt (prompt, answer, completion,
    success). Any HF causal LM: the warm start's, or TRL's trainer's (experiments/time_to_accuracy.py)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [encode_chat(tokenizer, p.messages) for p in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
        with context or contextlib.nullcontext():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        scores = env.score(chunk, [[t] for t in texts])
        rows += [{"prompt": p.messages[-1]["content"], "answer": p.answer, "greedy": t,
                  "greedy_success": env.success(s[0])} for p, t, s in zip(chunk, texts, scores)]
    model.train(was_training)
    return sum(r["greedy_success"] for r in rows) / len(rows), rows


def train_sft(policy: Policy, env: Env, sft: SFTConfig, log_dir: Path, progress: bool = True) -> dict:
    """`sft.steps` steps of answer-only cross-entropy on the env's reference answers; metrics.jsonl,
    eval.jsonl (step 0 and the last) and eval_samples.jsonl in `log_dir`. Returns the summary."""
    log_dir.mkdir(parents=True, exist_ok=True)
    held_out = env.eval_prompts("test", sft.eval_prompts)  # a split too small fails before training
    references(env, held_out[:1])  # an env without reference answers fails now, by name

    def evaluate(step: int) -> float:
        accuracy, rows = greedy_pass_at_1(policy.model, policy.tokenizer, env, held_out, env.max_tokens,
                                          policy.precision.served_context(policy.device))
        append_jsonl(log_dir / "eval.jsonl", [{"step": step, "eval/pass@1": accuracy}])
        append_jsonl(log_dir / "eval_samples.jsonl", [{"step": step, **r} for r in rows])
        return accuracy

    torch.manual_seed(sft.seed)
    before = evaluate(0)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=sft.lr, weight_decay=sft.weight_decay, fused=True)
    scheduler = warmup_schedule(optimizer, sft.steps, sft.decay, sft.warmup_steps)
    began = time.perf_counter()
    bar = tqdm(range(1, sft.steps + 1), desc="sft", disable=not progress, dynamic_ncols=True)
    for step in bar:
        prompts = env.sample(sft.batch_size)
        batch = answer_batch(policy, prompts, references(env, prompts))
        loss, metrics = answer_loss(policy, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), sft.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        record = {"step": step, **metrics, "grad_norm": float(grad_norm), "lr": lr,
                  "time_s": time.perf_counter() - began}
        append_jsonl(log_dir / "metrics.jsonl", [record])
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_acc=f"{metrics['token_accuracy']:.2f}")
    seconds = time.perf_counter() - began
    after = evaluate(sft.steps)
    summary = {"pass@1_before": before, "pass@1": after, "train_s": seconds, "steps": sft.steps,
               "final_loss": metrics["loss"], "precision": policy.precision.to_dict()}
    (log_dir / "sft.json").write_text(json.dumps(summary, indent=1))
    print(f"sft: {sft.steps} steps in {seconds:.0f}s, loss {metrics['loss']:.3f}, "
          f"held-out greedy pass@1 {before:.3f} -> {after:.3f}", flush=True)
    return summary


def sft_precision(model_cfg, hardware_cfg) -> Precision:
    """What the warm start computes in: the run's own rule (model.dtype, hardware.autocast), no server."""
    return Precision.resolve(model_cfg.dtype, model_cfg.master_dtype, hardware_cfg.autocast, hardware_cfg.device)


def warm_start_key(base: str, warm_start, precision: Precision) -> str:
    """Hash of everything the warm-started weights depend on: the base model (the tiny model's dir
    name carries its spec's key), the SFT settings, the env's config and the compute dtype."""
    blob = json.dumps({"base": Path(base).name if Path(base).is_dir() else base,
                       "sft": OmegaConf.to_container(warm_start.sft, resolve=True),
                       "env": OmegaConf.to_container(warm_start.env, resolve=True),
                       "compute": dtype_name(precision.compute)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def warm_start(base: str, warm_start, precision: Precision, device: str = "cpu",
               cache_dir: Optional[Path] = None) -> Path:
    """The model dir of `base` after `warm_start.sft` on `warm_start.env`, built once (process-safe,
    runtime/model_cache.py) into `<cache>/sft-<key>/`: the HF model, its tokenizer and the SFT's
    own records (metrics.jsonl, eval.jsonl, sft.json)."""
    name = f"sft-{warm_start_key(base, warm_start, precision)}"

    def build(out: Path) -> None:
        print(f"building the warm start {name} (once; cached): {warm_start.sft.steps} SFT steps", flush=True)
        policy = Policy(base, precision, device)
        OmegaConf.save(warm_start, out / "warm_start.yaml", resolve=True)  # what the key hashes, readable
        env = instantiate(warm_start.env)
        try:
            train_sft(policy, env, warm_start.sft, out, progress=False)
        finally:
            env.close()
        policy.save(out)

    return built_once(name, build, cache_dir)


register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from lab.server import base_model_path

    validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    precision = sft_precision(cfg.model, cfg.hardware)
    policy = Policy(base_model_path(cfg), precision, cfg.hardware.device)
    env = instantiate(cfg.env)
    try:
        summary = train_sft(policy, env, OmegaConf.to_object(cfg.sft), run_dir, progress=cfg.log.progress)
    finally:
        env.close()
    print(f"final model: {final.save(policy, run_dir)}", flush=True)
    return summary["pass@1"]


if __name__ == "__main__":
    main()
