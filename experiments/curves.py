"""Held-out pass@1 curves of runs, against steps and wall-clock seconds, from run dirs alone:

    python -m experiments.curves multirun/<date>/<time>       # a train.py sweep, e.g. -m experiment=arith mode=reload,lora train.seed=0,1,2
    python -m experiments.curves multirun/<sweep a> multirun/<sweep b> --target 0.6 --out <dir>

Each job's `eval.jsonl` gives pass@1 per eval step; its `metrics.jsonl` the seconds: the sum of the
steps' wall time up to that eval (evals, vLLM's start and the warm start excluded), and the same
sums per phase (generate/score/train/sync). Writes `curves.csv`, `curves.png` (mean over seeds per
mode, min-max band, each seed thin) and `curves_target.csv` (seconds and steps to the first eval at
or above `--target`) into the sweep dir. experiments/time_to_accuracy.py writes the same columns
with TRL's rows beside ours, and experiments/plot.py draws them the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from experiments.outputs import sweep_dir  # noqa: E402

PHASES = {"time_generate": "generate_s", "time_score": "score_s", "time_train": "train_s", "time_sync": "sync_s"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def eval_curve(run_dir: Path) -> list[dict]:
    """One row per held-out eval of a run: step, seconds of training before it, pass@1, phase sums."""
    steps = read_jsonl(run_dir / "metrics.jsonl")
    rows = []
    for ev in read_jsonl(run_dir / "eval.jsonl"):
        done = [m for m in steps if m["step"] <= ev["step"]]
        rows.append({"step": ev["step"], "seconds": sum(m["time_step"] for m in done), "pass@1": ev["eval/pass@1"],
                     **{col: sum(m.get(key, 0.0) for m in done) for key, col in PHASES.items()}})
    return rows


def sweep_curves(*folders: Path) -> pd.DataFrame:
    """Every job of train.py sweeps that evaluated: side `ours`, its run name as mode, its seed."""
    rows = []
    for job in sorted(p for folder in folders for p in folder.iterdir() if (p / "eval.jsonl").exists()):
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        rows += [{"side": "ours", "mode": cfg.name, "seed": cfg.train.seed, "run_dir": str(job), **r}
                 for r in eval_curve(job)]
    if not rows:
        raise FileNotFoundError(f"{[str(f) for f in folders]}: no job dir with an eval.jsonl")
    return pd.DataFrame(rows)


def label(side: str, mode: str) -> str:
    return f"TRL ({mode})" if side == "trl" else f"ours {mode}"


def time_to_target(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per side, mode and seed: the first eval at pass@1 >= target (seconds, step; NaN: never),
    the start and the best pass@1; then the mean over seeds per side and mode."""
    rows = []
    for (side, mode, seed), run in df.sort_values("step").groupby(["side", "mode", "seed"]):
        hit = run[run["pass@1"] >= target]
        rows.append({"side": side, "mode": mode, "seed": seed, "target": target,
                     "seconds": hit["seconds"].iloc[0] if len(hit) else float("nan"),
                     "step": hit["step"].iloc[0] if len(hit) else float("nan"),
                     "start": run["pass@1"].iloc[0], "final": run["pass@1"].iloc[-1], "best": run["pass@1"].max(),
                     "total_s": run["seconds"].iloc[-1]})
    return pd.DataFrame(rows)


def plot_curves(df: pd.DataFrame, target: float | None = None):
    """pass@1 against steps and against seconds: per side and mode the mean over seeds (line), the
    min-max band, and each seed thin."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((side, mode), runs) in enumerate(df.groupby(["side", "mode"])):
        color = colors[i % len(colors)]
        seeds = runs["seed"].nunique()
        per_step = runs.groupby("step")
        for ax, x in zip(axes, ("step", "seconds")):
            for _, run in runs.groupby("seed"):
                ax.plot(run[x], run["pass@1"], color=color, lw=0.6, alpha=0.5)
            xs = per_step[x].mean()
            ax.plot(xs, per_step["pass@1"].mean(), color=color, lw=2, label=f"{label(side, mode)}, {seeds} seeds")
            ax.fill_between(xs, per_step["pass@1"].min(), per_step["pass@1"].max(), color=color, alpha=0.15)
    for ax, x in zip(axes, ("step", "training seconds (evals excluded)")):
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=0.8)
    axes[0].set_ylabel("held-out greedy pass@1")
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out greedy pass@1 (mean over seeds, min-max band)", fontsize=10)
    fig.tight_layout()
    return fig


def write(df: pd.DataFrame, folder: Path, name: str, target: float) -> list[Path]:
    """`<name>.csv` (unless it is there), `<name>.png` and `<name>_target.csv` in `folder`."""
    out = [folder / f"{name}.png", folder / f"{name}_target.csv"]
    if not (folder / f"{name}.csv").exists():
        df.to_csv(folder / f"{name}.csv", index=False)
        out.insert(0, folder / f"{name}.csv")
    fig = plot_curves(df, target)
    fig.savefig(out[-2], dpi=120)
    plt.close(fig)
    time_to_target(df, target).to_csv(out[-1], index=False)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", help="train.py sweep dirs (multirun/<date>/<time>)")
    parser.add_argument("--target", type=float, default=0.6, help="pass@1 to time (curves_target.csv)")
    parser.add_argument("--out", help="where the CSVs and the PNG go (default: the first sweep dir)")
    args = parser.parse_args(argv)
    folders = [sweep_dir(s) for s in args.sweeps]
    out = Path(args.out) if args.out else folders[0]
    out.mkdir(parents=True, exist_ok=True)
    df = sweep_curves(*folders)
    df.to_csv(out / "curves.csv", index=False)
    for path in write(df, out, "curves", args.target):
        print(path)
    print(time_to_target(df, args.target).to_string(index=False))


if __name__ == "__main__":
    main()
