"""What serving an env costs a step: `env=remote` on loopback against the same env local.

    python -m experiments.env_service [--env synthetic] [--steps 20] [--warmup 3] [--rounds 2] [--out env_service.csv]

One vLLM server (the default config's) serves every run; runs alternate local, remote, local,
remote ... (`--rounds` pairs) so drift in the machine's load falls on both sides. Each run is the
default config at its default sizes (eval off, wandb off), `--steps` steps; the first `--warmup`
are dropped. Prints the median step time and its score phase per side, the ratio remote / local,
and writes one CSV row per run with the CPU model and whether it has AVX512-BF16.

On a shared machine the step time of two runs differs by more than the env's cost (the train
phase moves with the load), so the env's own cost is also timed alone: `env_ms`, the median over
`--calls` of one step's env work (sample P prompts, score P x G completions) on the env object,
local or remote, with no vLLM beside it; `env_ms` / step time is what serving the env costs a step.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from envs.remote import RemoteEnv

from envs.serve import served
from grpo import REPO_ROOT
from lab.loop import train
from lab.server import build_server, model_path
from runtime.config import register_configs
from runtime.cpuinfo import cpu_kind


def env_call_ms(env, cfg, calls: int) -> float:
    """Median ms of one step's env work: sample P prompts, score G completions of each."""
    P, G = cfg.train.prompts_per_step, cfg.train.group_size
    completions = [[f"{i} {j}" if j % 2 else "a b" for j in range(G)] for i in range(P)]
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        env.score(env.sample(P), completions)
        times.append((time.perf_counter() - began) * 1e3)
    env.close()
    return statistics.median(times)


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="synthetic")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default="env_service.csv")
    args = parser.parse_args()
    register_configs()
    common = ("log.wandb.mode=disabled", "log.progress=false", "eval.enabled=false", f"train.steps={args.steps}")
    base = config(*common, f"env={args.env}")
    rows, kind = [], cpu_kind()
    with tempfile.TemporaryDirectory() as tmp, build_server(base, Path(tmp), model=model_path(base)) as server, \
            served(f"env={args.env}") as url:
        attach = f"server.base_url={server.base_url}"
        sides = {"local": (f"env={args.env}",),
                 "remote": ("env=remote", f"env.url={url}", f"env.max_tokens={base.env.max_tokens}")}
        for round_ in range(args.rounds):
            for side, overrides in sides.items():
                history = train(config(*common, attach, *overrides), Path(tmp) / f"{side}-{round_}")[args.warmup:]
                rows.append({"side": side, "round": round_, "env": args.env, "steps": len(history),
                             "step_s": statistics.median(m["time_step"] for m in history),
                             "score_s": statistics.median(m["time_score"] for m in history),
                             "generate_s": statistics.median(m["time_generate"] for m in history),
                             "reward_last": history[-1]["reward_mean"], "cpu": kind})
    with served(f"env={args.env}") as url:
        env_ms = {"local": env_call_ms(instantiate(base.env), base, args.calls),
                  "remote": env_call_ms(RemoteEnv(url=url, max_tokens=base.env.max_tokens), base, args.calls)}
    for row in rows:
        row["env_ms"] = env_ms[row["side"]]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    med = {side: statistics.median(r["step_s"] for r in rows if r["side"] == side) for side in ("local", "remote")}
    score = {side: statistics.median(r["score_s"] for r in rows if r["side"] == side) for side in ("local", "remote")}
    print(f"CPU: {kind}")
    for side in med:
        print(f"{side:>6}: step {med[side] * 1e3:8.1f} ms   score phase {score[side] * 1e3:7.2f} ms")
    print(f"remote / local step time: {med['remote'] / med['local']:.3f}  ({args.out})")
    print(f"env work a step: local {env_ms['local']:.2f} ms, remote {env_ms['remote']:.2f} ms; the difference is "
          f"{(env_ms['remote'] - env_ms['local']) / 1e3 / med['local'] * 100:.2f} % of the local step")


if __name__ == "__main__":
    main()
