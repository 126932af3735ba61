"""What a multi-turn step costs beyond its generation (issue 24's benchmark): one CSV row per job.

    python -m experiments.multiturn_overhead env=calc            # 3 turns: rollout.max_turns=3

The run is built as `train.py` builds it and trained `bench.train_steps` steps first, until the
model calls its tool every turn (env=calc: 3 turns an episode). Each of `bench.repeats` timed steps
then samples its episodes (`episode_s`: every turn's requests, plus rendering, stitching and the
env between them), replays exactly the same requests back to back with nothing between
(`replay_s`: the sum of the turns' generation, the same prompts, seeds and caps, so the same
tokens; `replay_same_tokens` checks it), scores and trains on the rollout (`train_s`).
`overhead` = episode_s / replay_s is the per-turn cost of rendering, stitching and the env (the
issue's bound: <= 1.2); `env_s` and `stitch_s` split it, and `own_frac` is the episode's time
outside its vLLM calls over the time in them (the same cost, free of the replay's own noise on a
shared machine). Each timed phase starts on an idle server.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.errors import record_point
from experiments.quiet import server_pids, wait_quiet
from experiments.schema import MultiTurnBench, use_schema
from grpo.batch import Rollout
from grpo.seeds import rollout_seed
from lab.episodes import Episodes
from lab.loop import learn, train_step
from lab.run import Run, open_run

BENCH = MultiTurnBench
use_schema(BENCH)


class Recorded:
    """The run's client, recording each call (to replay it) and the seconds it took."""

    def __init__(self, client):
        self.client, self.calls, self.seconds = client, [], 0.0
        self.max_tokens = client.max_tokens  # each turn's cap, as the episodes read it

    def _call(self, name: str, *args):
        t = time.perf_counter()
        out = getattr(self.client, name)(*args)
        self.seconds += time.perf_counter() - t
        self.calls.append((name, args, out))
        return out

    def generate(self, prompt_ids, n, seed=None, stop_token_ids=()):
        return self._call("generate", prompt_ids, n, seed, stop_token_ids)

    def continue_each(self, prompt_ids, seeds, max_tokens, stop_token_ids=()):
        return self._call("continue_each", prompt_ids, seeds, max_tokens, stop_token_ids)


def timed(seconds: list[float], fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t)
    return wrapper


def timed_step(run: Run, step: int) -> dict:
    cfg, turns, pids = run.cfg, run.sampler.turns, server_pids(run.server)
    if not isinstance(turns, Episodes):
        raise ValueError(f"env {cfg.env._target_} is single-turn: this benchmark needs a multi-turn env (env=calc)")
    prompts = run.env.sample(cfg.train.prompts_per_step)
    prompt_ids = [turns.encode(p.messages) for p in prompts]
    env_s, stitch_s = [], []
    start, env_ids = run.env.start, turns.template.env_ids
    run.env.start = lambda prompt, seed: _timed_episode(start(prompt, seed), env_s)
    turns.template.env_ids = timed(stitch_s, env_ids)
    client = Recorded(run.client)
    wait_quiet(pids)
    t = time.perf_counter()
    try:
        groups = turns.generate(client, prompts, prompt_ids, cfg.train.group_size,
                                rollout_seed(cfg.train.seed, step), run.sampler.stride)
    finally:
        run.env.start, turns.template.env_ids = start, env_ids
    episode_s = time.perf_counter() - t
    wait_quiet(pids)
    replay_s, same = 0.0, True
    for name, args, out in client.calls:  # the same requests, one batch per turn, nothing between
        t = time.perf_counter()
        again = getattr(run.client, name)(*args)
        replay_s += time.perf_counter() - t
        same &= _ids(again) == _ids(out)
    rollout = Rollout(prompts, prompt_ids, groups)
    run.sampler.score(rollout)
    t = time.perf_counter()
    learn(run, rollout, step)
    train_s = time.perf_counter() - t
    metrics = rollout.completion_metrics()
    return {"episode_s": episode_s, "generate_s": client.seconds, "replay_s": replay_s, "env_s": sum(env_s),
            "stitch_s": sum(stitch_s), "train_s": train_s, "overhead": episode_s / replay_s,
            "own_frac": (episode_s - client.seconds) / client.seconds,  # the episode's time outside vLLM calls
            "replay_same_tokens": same, "requests": len(client.calls), "turns_mean": metrics["turns_mean"],
            "sampled_tokens": metrics["completion_len_mean"], "env_tokens": metrics["env_tokens_mean"]}


def _timed_episode(episode, seconds: list[float]):
    episode.step = timed(seconds, episode.step)
    return episode


def _ids(out) -> list:
    return [[c.token_ids for c in group] if isinstance(group, list) else group.token_ids for group in out]


def measure(cfg: DictConfig, run_dir: Path) -> dict:
    with open_run(cfg, run_dir) as run:
        for step in range(1, cfg.bench.train_steps + 1):
            run.logger.step(step, train_step(run, step))
        first = cfg.bench.train_steps + 1
        steps = [timed_step(run, step) for step in range(first, first + cfg.bench.repeats)]
        median = {k: statistics.median(s[k] for s in steps) for k in steps[0] if k != "replay_same_tokens"}
        return {**median, "overhead_all": " ".join(f"{s['overhead']:.3f}" for s in steps),
                "replay_same_tokens": all(s["replay_same_tokens"] for s in steps), "load_1m": os.getloadavg()[0]}


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    row = {"mode": cfg.name, "env": cfg.env._target_, "prompts": cfg.train.prompts_per_step,
           "group_size": cfg.train.group_size, "max_tokens": cfg.rollout.max_tokens, "max_turns": cfg.rollout.max_turns,
           "repeats": cfg.bench.repeats, "run_dir": str(run_dir)}
    row = record_point(cfg, run_dir, row, measure)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "run_dir"})


if __name__ == "__main__":
    main()
