"""TRL's `GRPOTrainer` (HF `generate`, no vLLM) on our workload: the baseline experiments/step_time.py
measures our step against.

Same model directory, prompts per step (in the same order), group size, completion length,
dtype, thread count, env reward, learning rate and loss options as our run. Each optimizer step is
split by timing TRL's own methods: `_generate` (tokenise, HF `generate`, decode) and
`_calculate_rewards` (our env's `score`); the rest of the step (logprobs, loss, backward, AdamW)
is `train`. TRL moves no weights, so its `sync` is 0.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from envs.base import Env
from grpo.data import Prompt

INSTALL = 'pip install -e ".[bench]"'


def require_trl():
    """TRL is the `bench` extra: say how to get it before any minute is spent on our side."""
    try:
        import trl
    except ImportError as exc:
        raise ImportError(f"the step-time benchmark runs TRL's GRPOTrainer, and trl is not installed: "
                          f"{INSTALL} (trl==1.16.*), or bench.trl=false to time our step alone") from exc
    return trl


class StepTimes(TrainerCallback):
    """Per optimizer step: wall seconds, and the part of it in TRL's generation and reward calls."""

    def __init__(self, trainer):
        self.steps: list[dict] = []
        self._now: dict = {}
        trainer._generate = self._timed(trainer._generate, "generate_s")
        trainer._calculate_rewards = self._timed(trainer._calculate_rewards, "score_s")

    def _timed(self, fn, phase: str):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self._now[phase] += time.perf_counter() - t
            if phase == "generate_s":  # (prompt_ids, completion_ids, ...): tokens as generated, EOS included
                self._now["tokens"] += sum(len(ids) for ids in out[1])
            return out

        return timed

    def on_step_begin(self, args, state, control, **kwargs):
        self._now = {"generate_s": 0.0, "score_s": 0.0, "tokens": 0, "t0": time.perf_counter()}

    def on_step_end(self, args, state, control, **kwargs):
        step_s = time.perf_counter() - self._now.pop("t0")
        self.steps.append({**self._now, "step_s": step_s, "sync_s": 0.0,
                           "train_s": step_s - self._now["generate_s"] - self._now["score_s"]})


def env_reward(env: Env, prompts: list[Prompt]):
    """Our env's `score` as a TRL reward function; the dataset's `index` column names the prompt."""

    def reward(completions, index, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = env.score([prompts[i] for i in index], [[t] for t in texts])
        return [env.reward_weights.total(components) for (components,) in scores]

    reward.__name__ = type(env).__name__  # TRL logs each reward under its function's name
    return reward


def trl_steps(cfg, path: str, batches: list[list[Prompt]], env: Env, out_dir, threads: int, compute: torch.dtype,
              callbacks=()):
    """Run TRL's GRPOTrainer for len(batches) optimizer steps, batch i as step i's prompts, its
    forward/backward in `compute` (our trainer's): (one `StepTimes` dict per step, the trained model).
    `callbacks`: functions (trainer, its StepTimes) -> a TrainerCallback, added after the timer."""
    trl = require_trl()
    from datasets import Dataset

    prompts = [p for batch in batches for p in batch]
    dataset = Dataset.from_list([{"prompt": p.messages, "index": i} for i, p in enumerate(prompts)])
    P, G, T = cfg.train.prompts_per_step, cfg.train.group_size, cfg.rollout.max_tokens
    args = trl.GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=cfg.hardware.device == "cpu",
        bf16=compute == torch.bfloat16,  # GRPOConfig defaults to True; fp32 must say so
        fp16=compute == torch.float16,
        per_device_train_batch_size=P * G,  # one generation batch = one optimizer step, as ours
        gradient_accumulation_steps=1,
        num_generations=G,
        max_completion_length=T,
        # HF generate has no ignore_eos: forbidding EOS before T gives the same token count.
        generation_kwargs={"min_new_tokens": T} if cfg.rollout.ignore_eos else None,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        learning_rate=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        lr_scheduler_type="constant",  # a schedule changes no step's time
        max_grad_norm=cfg.train.max_grad_norm,
        beta=cfg.loss.beta,
        loss_type=cfg.loss.loss_type,
        epsilon=cfg.loss.epsilon_low,
        epsilon_high=cfg.loss.epsilon_high,
        scale_rewards=cfg.advantage.scale_rewards,
        num_iterations=cfg.train.num_iterations,
        max_steps=len(batches),
        shuffle_dataset=False,  # step i trains on batch i, as our run does
        seed=cfg.train.seed,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        logging_steps=len(batches) + 1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32 masters under autocast, as ours
    trainer = trl.GRPOTrainer(model=model, reward_funcs=env_reward(env, prompts), args=args,
                              train_dataset=dataset, processing_class=tokenizer)
    times = StepTimes(trainer)
    trainer.add_callback(times)
    for make in callbacks:
        trainer.add_callback(make(trainer, times))
    torch.set_num_threads(threads)
    trainer.train()
    return times.steps, trainer.model
