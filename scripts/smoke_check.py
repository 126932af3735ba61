"""The verdicts of one smoke run (scripts/gpu_smoke.sh), read from its `sync.jsonl`, one line each:

    <name>/syncs: every step synced (the bridge verified each; a failed sync stops the run)
    <name>/probe_gap: max |dlogprob| vLLM vs trainer over the probe, every sync, <= --tol
    <name>/served_changed: vLLM's probe logprobs moved > --moved at every sync (extra.served_moved)
    <name>/in_place: (--in-place) every sync after the first wrote fewer bytes than the first
        (a full save): the tied embedding no longer forces a full rewrite

    python scripts/smoke_check.py RUN_DIR --name reload --steps 2 --tol 0.15 --moved 1e-3 [--in-place]

Exits 1 if any verdict is FAIL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def verdicts(syncs: list[dict], steps: int, tol: float, moved: float, in_place: bool) -> list[tuple[str, bool, str]]:
    out = [("syncs", [s["step"] for s in syncs] == list(range(1, steps + 1)),
            f"synced steps {[s['step'] for s in syncs]}, expected 1..{steps}")]
    if not syncs:
        return out
    gap = max(s["probe_max_diff"] for s in syncs)
    out.append(("probe_gap", gap <= tol, f"max probe |dlogprob| {gap:.3g} (tolerance {tol})"))
    shifts = [s.get("extra", {}).get("served_moved") for s in syncs]
    out.append(("served_changed", all(m is not None and m > moved for m in shifts),
                f"vLLM's probe moved by {['-' if m is None else f'{m:.3g}' for m in shifts]} (need > {moved})"))
    if in_place:
        sizes = [s["bytes"] for s in syncs]
        out.append(("in_place", len(sizes) > 1 and all(0 < b < sizes[0] for b in sizes[1:]),
                    f"bytes per sync {sizes} (after the first: the changed tensors only)"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--tol", type=float, required=True)
    parser.add_argument("--moved", type=float, required=True)
    parser.add_argument("--in-place", action="store_true")
    args = parser.parse_args()
    path = args.run_dir / "sync.jsonl"
    syncs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    failed = False
    for check, ok, detail in verdicts(syncs, args.steps, args.tol, args.moved, args.in_place):
        print(f"{args.name}/{check}: {'PASS' if ok else 'FAIL'} {detail}")
        failed |= not ok
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
