"""Peak trainer memory of one forward + backward through the logprobs, with the LM head whole or
in chunks (`train.logprob_chunk_tokens`, grpo/token_scores.py), at a real vocabulary.

    python -m experiments.logprob_memory                       # vocab 151,936, 256 completion tokens
    python -m experiments.logprob_memory --vocab 512 --rows 2 --completion 16 --chunks none,8   # toy

A tiny Qwen2 (`model.tiny`, 2 layers x 128 wide) built with `--vocab` tokens, fp32 master weights
(`--autocast bfloat16`: bf16 compute over them, as hardware.autocast does). Each point (rows x
completion tokens, chunk) runs in a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own:
the model loaded, then `Policy.logprobs_and_entropy` (entropy as the logged metric) and the
backward of a GRPO-shaped loss on it. `step_mb` = peak - RSS once the model is loaded: what the
logprobs cost. Points whose unchunked logits alone would exceed `--max-logits-gb` are not run
(a row says so): on a shared machine, 64 x 256 x 151,936 fp32 logits are 10 GB per copy.
Rows go to `--csv` (default outputs/logprob_memory.csv) and a table is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from grpo import REPO_ROOT

QWEN_VOCAB = 151_936  # Qwen2.5's vocabulary: what the unchunked head's logits scale with


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(path: str, rows: int, completion: int, prompt: int, chunk: int | None, autocast: str | None) -> dict:
    """One point, in this process: peak RSS of one scoring forward + backward."""
    import torch

    from grpo.batch import Batch
    from grpo.policy import Policy
    from grpo.precision import Precision

    torch.manual_seed(0)
    policy = Policy(path, Precision.resolve("float32", autocast=autocast), logprob_chunk_tokens=chunk)
    vocab = policy.model.config.vocab_size
    loaded = peak_mb()
    ids = torch.randint(0, vocab, (rows, prompt + completion))
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=torch.ones(rows, completion),
                  sampling_logp=torch.zeros(rows, completion), advantages=torch.randn(rows), prompt_len=prompt)
    began = time.perf_counter()
    logp, entropy = policy.logprobs_and_entropy(batch)
    (-(logp * batch.advantages[:, None]).mean()).backward()
    seconds = time.perf_counter() - began
    grad = policy.model.lm_head.weight.grad
    return {"peak_mb": peak_mb(), "loaded_mb": loaded, "step_mb": peak_mb() - loaded, "seconds": seconds,
            "entropy_mean": float(entropy.mean()), "head_grad_norm": float(grad.norm())}


def point(args, path: str, rows: int, chunk: int | None) -> dict:
    """A point's row, measured in a fresh subprocess (or skipped, saying why)."""
    row = {"vocab": args.vocab, "rows": rows, "completion": args.completion, "prompt": args.prompt,
           "tokens": rows * args.completion, "chunk": chunk if chunk is not None else "none",
           "autocast": args.autocast or "none"}
    logits_gb = rows * args.completion * args.vocab * 4 / 2 ** 30
    if chunk is None and logits_gb > args.max_logits_gb:
        return row | {"skipped": f"unchunked logits {logits_gb:.1f} GB per copy > --max-logits-gb {args.max_logits_gb}"}
    command = [sys.executable, "-m", "experiments.logprob_memory", "--point", path, str(rows), str(chunk),
               "--completion", str(args.completion), "--prompt", str(args.prompt)] + \
              (["--autocast", args.autocast] if args.autocast else [])
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return row | {"skipped": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
    return row | json.loads(proc.stdout.strip().splitlines()[-1])


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--rows", default="4,8,64", help="micro-batch rows, comma-separated")
    parser.add_argument("--completion", type=int, default=256, help="completion tokens per row")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--chunks", default="none,1024,256", help="train.logprob_chunk_tokens values; none: unchunked")
    parser.add_argument("--autocast", default=None, help="bfloat16: bf16 compute over fp32 weights")
    parser.add_argument("--max-logits-gb", type=float, default=3.0)
    parser.add_argument("--csv", default="outputs/logprob_memory.csv")
    parser.add_argument("--point", nargs=3, metavar=("PATH", "ROWS", "CHUNK"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.point:  # a child: one measurement, one JSON line
        path, rows, chunk = args.point
        print(json.dumps(measure(path, int(rows), args.completion, args.prompt,
                                 None if chunk == "None" else int(chunk), args.autocast)))
        return []
    from runtime.tiny_model import TinySpec, build_tiny_model

    path = str(build_tiny_model(TinySpec(vocab_size=args.vocab)))
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
    results = [point(args, path, int(rows), chunk) for rows in args.rows.split(",") for chunk in chunks]
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in results for k in r))
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(results)
    print(f"vocab {args.vocab}, {args.completion} completion + {args.prompt} prompt tokens a row, "
          f"autocast {args.autocast or 'none'}; peak RSS of a fresh process (MB)")
    print(f"{'rows':>5} {'chunk':>6} {'peak':>8} {'step':>8} {'seconds':>8}")
    for r in results:
        if "skipped" in r:
            print(f"{r['rows']:>5} {r['chunk']:>6}  skipped: {r['skipped']}")
        else:
            print(f"{r['rows']:>5} {r['chunk']:>6} {r['peak_mb']:>8.0f} {r['step_mb']:>8.0f} {r['seconds']:>8.2f}")
    print(f"-> {out}")
    return results


if __name__ == "__main__":
    main()
