"""Held-out evaluation through the vLLM server: greedy pass@1, sampled pass@k, reward components.

In a run (`eval` config, train.py): the `Evaluator` is built at start, reading its prompts then,
so a missing split or `eval.n` < `eval.k` fails before vLLM starts. It runs at the start, every
`eval.every` steps and after the last step, on whatever weights vLLM serves at that moment (full
weights, merged LoRA, or the LoRA adapter the rollout client names), and the run logger writes
`eval.jsonl` (one line an eval) and `eval_samples.jsonl` (one row a prompt).

Per eval, on `eval.num_prompts` prompts of the env's held-out `eval.split` (never a training
prompt, `Env.eval_prompts`):
- `eval/pass@1`: one greedy completion (temperature 0) per prompt, the fraction that `Env.success`;
- `eval/pass@<k>`: `eval.n` samples at `eval.temperature`, the unbiased estimator of Chen et al.
  (2021) from the c successes among n, averaged over prompts; samples are seeded the same way at
  every eval, so two evals differ by the weights, not by the draw;
- `eval/reward`, `eval/reward/<component>`: the greedy completions' weighted reward and components.

On its own, for a saved model (starts and stops its own vLLM server):

    python -m lab.evaluate <run dir | checkpoint dir | HF model dir> [--out DIR] [key=value ...]

A run dir means its `final/` (E2's end-of-run model) or else its newest complete checkpoint; the
run's own overrides (`.hydra/overrides.yaml`) are applied first, the command line's after.
A LoRA adapter dir is served as `<dir>/merged/` if present, else as a vLLM LoRA module on the base
model its adapter_config.json names.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Optional

from envs.base import Env
from grpo.data import Prompt
from grpo.batch import Rollout
from grpo.seeds import eval_seed
from lab.episodes import Turns, build_turns
from serving.client import VLLMClient

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    the chance that k of the n, drawn without replacement, hold at least one correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class Evaluator:
    """Scores the served model on a fixed set of held-out prompts; see the module docstring."""

    def __init__(self, env: Env, split: str, num_prompts: int, n: int, k: int, max_tokens: int,
                 temperature: float, every: int, seed: int = 0):
        if n < k:
            raise ValueError(f"eval.n={n} < eval.k={k}: pass@{k} needs at least k samples per prompt")
        self.env = env
        self.prompts: list[Prompt] = env.eval_prompts(split, num_prompts)  # a bad split fails here
        self.n, self.k, self.max_tokens, self.temperature, self.every = n, k, max_tokens, temperature, every
        self.seed = eval_seed(seed)  # apart from every training step's (grpo/seeds.py)
        self._prompt_ids: Optional[list[list[int]]] = None

    @classmethod
    def from_config(cls, cfg, env: Env) -> "Evaluator":
        ev = cfg.eval
        return cls(env, ev.split, ev.num_prompts, ev.n, ev.k, ev.max_tokens or cfg.rollout.max_tokens,
                   ev.temperature, ev.every, cfg.train.seed)

    def due(self, step: int, last: int) -> bool:
        """Before training (step 0), every `every` steps, and after the last step."""
        return step in (0, last) or bool(self.every and step % self.every == 0)

    def __call__(self, client: VLLMClient, turns: Turns) -> tuple[dict, list[dict]]:
        """(metrics `eval/...`, one row per prompt) for the model `client` names on its server; a
        multi-turn env's completions are whole episodes (`turns`: lab/episodes.py)."""
        start = time.perf_counter()
        if self._prompt_ids is None:
            self._prompt_ids = [turns.encode(p.messages) for p in self.prompts]

        def sampler(temperature: float) -> VLLMClient:
            out = VLLMClient(client.server, client.model, max_tokens=self.max_tokens, temperature=temperature)
            out.deadline = client.server.deadline("eval_s")
            return out

        stride = len(self.prompts) * self.n  # an episode's later turns' seed bands (grpo/seeds.py)
        greedy = turns.generate(sampler(0.0), self.prompts, self._prompt_ids, 1, None, stride)
        sampled = turns.generate(sampler(self.temperature), self.prompts, self._prompt_ids, self.n, self.seed, stride)
        # One score call for both, so a verifier pool scores them all in parallel.
        scores = turns.score(self.prompts, [g + s for g, s in zip(greedy, sampled)])
        rollout = Rollout(self.prompts, self._prompt_ids, greedy)
        rollout.set_scores([row[:1] for row in scores], self.env.reward_weights)
        passes = [sum(self.env.success(s) for s in row[1:]) for row in scores]
        reward = rollout.reward_metrics()
        metrics = {
            "eval/pass@1": sum(self.env.success(row[0]) for row in scores) / len(scores),
            f"eval/pass@{self.k}": sum(pass_at_k(self.n, c, self.k) for c in passes) / len(passes),
            "eval/reward": reward["reward_mean"],
            **{f"eval/{name}": v for name, v in reward.items() if name.startswith("reward/")},
            "eval/time_s": time.perf_counter() - start,
        }
        rows = [{"prompt": p.messages[-1]["content"], "answer": p.answer, "greedy": g[0].text,
                 "greedy_reward": r, "greedy_success": self.env.success(row[0]),
                 **{f"greedy/{name}": v for name, v in row[0].items()},
                 "sample_successes": c, "n": self.n, f"pass@{self.k}": pass_at_k(self.n, c, self.k),
                 "samples": [x.text for x in s]}
                for p, g, s, row, c, r in zip(self.prompts, greedy, sampled, scores, passes, rollout.rewards[:, 0].tolist())]
        return metrics, rows


def append_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def find_model(target: Path) -> tuple[Path, Optional[Path], Optional[int]]:
    """(model dir, run dir or None, step or None) for a run dir, checkpoint dir or HF model dir."""
    from runtime import checkpoint

    if not target.exists():  # relative: from the cwd the command was typed in
        raise FileNotFoundError(f"{target}: no such file or directory ({target.absolute()})")
    target = target.resolve()
    if checkpoint.is_complete(target):
        return target / "policy", target.parent.parent, checkpoint.saved_step(target)
    if (target / "final").is_dir():
        return target / "final", target, None
    if (target / "checkpoints").is_dir():
        ckpt = checkpoint.newest_complete(target)
        return ckpt / "policy", target, checkpoint.saved_step(ckpt)
    if (target / "config.json").is_file() or (target / "adapter_config.json").is_file():
        run_dir = target.parent if (target.parent / ".hydra").is_dir() else None  # <run dir>/final
        return target, run_dir, None
    raise FileNotFoundError(f"{target}: not a run dir (final/ or checkpoints/), a checkpoint (step-*/COMPLETE) "
                            "or a model dir (config.json or adapter_config.json)")


def served_model(model_dir: Path) -> tuple[Path, list[str], Optional[str]]:
    """(what vLLM loads, extra server args, the model name requests use instead of the served
    name): a LoRA adapter without merged/ is served as a LoRA module on its base model."""
    adapter = model_dir / "adapter_config.json"
    if not adapter.is_file():
        return model_dir, [], None
    if (model_dir / "merged" / "config.json").is_file():
        return model_dir / "merged", [], None
    spec = json.loads(adapter.read_text())
    name = "eval-adapter"
    rank = next(r for r in LORA_RANKS if r >= spec["r"])
    return Path(spec["base_model_name_or_path"]), [
        "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "1",
        "--lora-modules", f"{name}={model_dir}"], name


def compose_config(run_dir: Optional[Path], overrides: list[str]):
    """The run's config as `python train.py <its overrides> <these>` composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grpo import REPO_ROOT
    from runtime.config import register_configs

    register_configs()
    saved = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    before = list(OmegaConf.load(saved)) if saved and saved.is_file() else []
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=before + overrides)


def evaluate_saved(target: str | Path, overrides: list[str] = (), out_dir: Optional[str | Path] = None) -> dict:
    """Evaluate a saved model on a vLLM server of its own; writes eval.jsonl and eval_samples.jsonl
    (and vllm.log) into `out_dir` and returns the metrics."""
    from hydra.utils import instantiate
    from transformers import AutoTokenizer

    from runtime.config import validate
    from grpo.policy import encode_chat
    from lab.server import build_server

    model_dir, run_dir, step = find_model(Path(target))
    cfg = compose_config(run_dir, list(overrides))
    if cfg.server.base_url:
        raise ValueError("server.base_url: python -m lab.evaluate serves the model it evaluates on its own server")
    validate(cfg)
    out = Path(out_dir or Path("outputs") / "eval" / time.strftime("%Y-%m-%d/%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    env = instantiate(cfg.env)
    try:
        evaluator = Evaluator.from_config(cfg, env)  # a bad split or n < k fails before vLLM starts
        path, args, adapter = served_model(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        turns = build_turns(env, tokenizer, lambda messages: encode_chat(tokenizer, messages), str(model_dir), cfg.rollout)
        with build_server(cfg, out, model=str(path), extra_args=tuple(args)) as server:
            client = VLLMClient(server, adapter or cfg.model.served_name)
            metrics, rows = evaluator(client, turns)
    finally:
        env.close()
    record = {"step": step, "model": str(model_dir), **metrics}
    append_jsonl(out / "eval.jsonl", [record])
    append_jsonl(out / "eval_samples.jsonl", [{"step": step, **row} for row in rows])
    return record


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="run dir, checkpoint dir (step-*), or HF model dir")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train.py (env=gsm8k eval.n=8 ...)")
    parser.add_argument("--out", help="output dir (default outputs/eval/<date>/<time>)")
    args = parser.parse_intermixed_args(argv)  # --out may come between the target and the overrides
    print(json.dumps(evaluate_saved(args.target, args.overrides, args.out), indent=1))


if __name__ == "__main__":
    main()
