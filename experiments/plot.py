"""Charts of a sweep CSV, saved as PNG next to it: rollout throughput by TP x DP, sync latency
by mode and model size, GRPO step time (ours vs TRL, and ours by trainer processes x vLLM TP x
DP) by phase, held-out pass@1 against steps and seconds (experiments/curves.py). Runs at the end of a preset's
sweep (the `PlotSweep` callback) or alone:

    python -m experiments.plot multirun/rollout_throughput/<time>        # every CSV in the dir
    python -m experiments.plot multirun/sync_latency/<time>/sync_latency.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: sweeps run on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402

from experiments.curves import write  # noqa: E402
from experiments.outputs import sweep_dir  # noqa: E402
from experiments.schema import TimeToAccuracyBench  # noqa: E402

TARGET = TimeToAccuracyBench.target


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of grid points that ran (an empty `error` cell reads back as NaN)."""
    return df[df["error"].isna() | (df["error"].astype(str) == "")] if "error" in df else df


def mark_failed(ax, x: float) -> None:
    ax.text(x, 0, "failed\n(see error)", ha="center", va="bottom", fontsize=8)


def plot_rollout(df: pd.DataFrame):
    """Generated tokens/s (median) and speedup over HF generate, per TP x DP and workload."""
    df = df.assign(grid=[f"tp{t}×dp{d}" for t, d in zip(df["tp"], df["dp"])],
                   workload=[f"G={g}, T={t}" for g, t in zip(df["group_size"], df["max_tokens"])])
    grids = list(dict.fromkeys(df.sort_values(["tp", "dp"])["grid"]))
    workloads = list(dict.fromkeys(df.sort_values(["group_size", "max_tokens"])["workload"]))
    good = ok_rows(df)
    panels = [("vllm_tokens_per_s", "vLLM generated tokens/s")]
    if "speedup" in good and good["speedup"].notna().any():
        panels.append(("speedup", "speedup over HF generate (×)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    width = 0.8 / max(len(workloads), 1)
    for ax, (column, title) in zip(axes[0], panels):
        for i, workload in enumerate(workloads):
            sub = good[good["workload"] == workload].set_index("grid")
            values = [sub[column].get(g, float("nan")) for g in grids]
            ax.bar([x + i * width for x in range(len(grids))], values, width, label=workload)
        for x, grid in enumerate(grids):
            if grid not in set(good["grid"]):
                mark_failed(ax, x + 0.4 - width / 2)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(grids))], grids)
        ax.set_title(title)
        if column == "speedup":
            ax.axhline(1.0, color="grey", lw=0.8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sync(df: pd.DataFrame):
    """Median sync ms (bars: min..max over repeats) against parameter count, one line per mode."""
    good = ok_rows(df).sort_values("params_m")
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, sub in good.groupby("mode"):
        err = [sub["sync_ms"] - sub["sync_ms_min"], sub["sync_ms_max"] - sub["sync_ms"]]
        ax.errorbar(sub["params_m"], sub["sync_ms"], yerr=err, marker="o", capsize=3, label=mode)
    ax.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="sync ms (median)",
           title="weight sync latency by mode")
    ax.legend()
    fig.tight_layout()
    return fig


STEP_PHASES = {"generate_s": "generate", "score_s": "score", "train_s": "train", "sync_s": "sync"}
LAYOUT = ["trainer_procs", "tp", "dp"]  # absent from CSVs written before the trainer-processes axis: 1 each


def plot_step_time(df: pd.DataFrame):
    """Median step time split by phase, one bar per side (ours, TRL) and per layout of ours
    (trainer processes x vLLM TP x DP); one panel (own scale) per model size and workload; a
    point that failed says so in place of its bar; TRL/ours in the title (> 1: ours is faster)."""
    layout = df.reindex(columns=LAYOUT).fillna(1).astype(int).set_axis(["procs_", "tp_", "dp_"], axis=1)
    several = len(layout[df["side"] == "ours"].drop_duplicates()) > 1
    df = pd.concat([df, layout], axis=1)
    df["bar"] = [f"ours\n{p}p tp{t} dp{d}" if side == "ours" and LAYOUT[0] in df else side
                 for side, p, t, d in zip(df["side"], df["procs_"], df["tp_"], df["dp_"])]
    order = df.sort_values([c for c in ("params_m", "max_tokens", "dtype") if c in df], na_position="last")
    points = list(dict.fromkeys(zip(order["size"], order["max_tokens"], order["dtype"])))
    panels = [df[(df["size"] == s) & (df["max_tokens"] == t) & (df["dtype"] == d)]
              .sort_values(["side", "procs_", "tp_", "dp_"]) for s, t, d in points]
    widths = [max(3.2, 0.8 * sub["bar"].nunique() + 1) for sub in panels] or [3.2]
    width = sum(widths) + 1.8  # inches: the panels, then the legend on the right
    fig, axes = plt.subplots(1, len(widths), figsize=(width, 4.4), squeeze=False, width_ratios=widths)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (size, tokens, dtype), sub in zip(axes[0], points, panels):
        bars, good = list(dict.fromkeys(sub["bar"])), ok_rows(sub)
        for x, bar in enumerate(bars):
            done = good[good["bar"] == bar]
            if done.empty:
                mark_failed(ax, x)
                continue
            row, bottom = done.iloc[-1], 0.0
            for i, (column, label) in enumerate(STEP_PHASES.items()):
                ax.bar(x, row[column], 0.6, bottom=bottom, color=colors[i], label=label)
                bottom += row[column]
            # Phases are medians one by one; the whole step's median is the black line.
            ax.plot([x - 0.35, x + 0.35], [row["step_s"]] * 2, color="black", lw=1.5, label="step")
        ax.set_xticks(range(len(bars)), bars, fontsize=8)
        ratio = good["ratio"].dropna() if "ratio" in good else pd.Series(dtype=float)
        ax.set_title(f"{size}, {tokens} tok, {dtype}" + (f"\nTRL/ours {ratio.iloc[-1]:.2f}×" if len(ratio) else ""),
                     fontsize=9)
    axes[0][0].set_ylabel("seconds per step (median)")
    legend = dict(zip(*reversed(axes[0][0].get_legend_handles_labels())))  # label -> handle, once each
    fig.legend(legend.values(), legend.keys(), loc="upper right", fontsize=8)
    title = "GRPO step: ours (vLLM) vs TRL (HF generate)" if "trl" in set(df["side"]) else "GRPO step (ours)"
    fig.suptitle(title + (" by trainer processes × vLLM TP × DP" if several else ""), fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / width, 1))
    return fig


def plot_csv(path: str | Path) -> Path:
    """Plot one sweep CSV (kind told by its columns); return the PNG written next to it."""
    path = Path(path)
    df = pd.read_csv(path)
    if "pass@1" in df:  # held-out pass@1 curves (experiments/time_to_accuracy.py): the plot and the time to target
        return write(df, path.parent, path.stem, TARGET)[-2]
    fig = plot_step_time(df) if "side" in df else plot_rollout(df) if "tp" in df else plot_sync(df)
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_dir(folder: str | Path) -> list[Path]:
    # `<name>_target.csv` is the time-to-target table a pass@1 plot writes beside its CSV
    return [plot_csv(p) for p in sorted(Path(folder).glob("*.csv")) if not p.name.endswith("_target.csv")]


class PlotSweep(Callback):
    """Hydra callback: plot every CSV of the sweep dir once the last job has run."""

    def on_multirun_end(self, config, **kwargs) -> None:
        for png in plot_dir(config.hydra.sweep.dir):
            print(f"plot: {png}")


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    for arg in argv:
        for png in plot_dir(sweep_dir(arg)) if Path(arg).is_dir() else [plot_csv(arg)]:  # a dir without CSVs: an error
            print(png)


if __name__ == "__main__":
    main(sys.argv[1:])
