"""What `hardware.compile` costs and saves on this machine: the constants of `hardware.compile=auto`
(lab/autocompile.py: COMPILE_S, SAVING).

    python -m experiments.compile_payback --size 28m               # the threshold's figures (idle machine)
    python -m experiments.compile_payback --size toy --steps 2      # smoke

One train phase's work without vLLM: a tiny model of `--size` (conf/bench/step_time.yaml's
sizes), `--rows` rows of `--prompt` + `--completion` tokens (step_time's workload: 64 x 64),
forward + backward through `Policy.logprobs_and_entropy` and a fused AdamW step, at the precision
`hardware=cpu` resolves here (`--autocast auto`: bf16 compute where the CPU has it natively).
`--steps` eager steps after one warm-up, then the decoder compiled in place (`Policy.compile`, as
train.py does), its first step (the compile) and `--steps` more. One CSV row (`--csv`) and a
printed line: eager_s and compiled_s (medians), compile_s = first compiled step - eager_s,
saving = 1 - compiled_s / eager_s, payback_steps = compile_s / (eager_s - compiled_s).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from grpo import REPO_ROOT
from grpo.batch import Batch
from grpo.policy import Policy
from grpo.precision import Precision, cpu_bf16_native, dtype_name
from runtime.tiny_model import TinySpec, build_tiny_model


def spec(size: str) -> TinySpec:
    """The step-time benchmark's model of this size (one list of sizes for both benchmarks)."""
    sizes = OmegaConf.load(REPO_ROOT / "conf" / "bench" / "step_time.yaml").bench.sizes
    if size not in sizes:
        raise ValueError(f"--size {size}: one of {sorted(sizes)}")
    s = sizes[size]
    return TinySpec(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                    num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                    num_key_value_heads=s.num_attention_heads)


def timed_steps(policy: Policy, optimizer, batch: Batch, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logp, _ = policy.logprobs_and_entropy(batch)
        (-(logp * batch.advantages[:, None]).mean()).backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times


def measure(args) -> dict:
    torch.manual_seed(0)
    precision = Precision.resolve("float32", autocast=None if args.autocast == "none" else args.autocast)
    policy = Policy(build_tiny_model(spec(args.size)), precision)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-6, fused=True)
    ids = torch.randint(3, policy.model.config.vocab_size, (args.rows, args.prompt + args.completion))
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids),
                  completion_mask=torch.ones(args.rows, args.completion),
                  sampling_logp=torch.zeros(args.rows, args.completion), advantages=torch.randn(args.rows),
                  prompt_len=args.prompt)
    eager = statistics.median(timed_steps(policy, optimizer, batch, args.steps + 1)[1:])  # one warm-up
    policy.compile()
    first, *rest = timed_steps(policy, optimizer, batch, args.steps + 1)
    compiled = statistics.median(rest)
    compile_s = first - compiled
    return {"size": args.size, "params_m": sum(p.numel() for p in policy.model.parameters()) / 1e6,
            "rows": args.rows, "tokens": args.rows * (args.prompt + args.completion), "steps": args.steps,
            "compute_dtype": dtype_name(precision.compute), "cpu_bf16_native": cpu_bf16_native(),
            "threads": torch.get_num_threads(), "eager_s": eager, "compiled_s": compiled, "first_compiled_s": first,
            "compile_s": compile_s, "saving": 1 - compiled / eager,
            "payback_steps": compile_s / (eager - compiled) if eager > compiled else float("inf")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="28m")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=24)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps each, eager and compiled")
    parser.add_argument("--autocast", default="auto", help="auto | bfloat16 | none (hardware.autocast)")
    parser.add_argument("--csv", default="outputs/compile_payback.csv")
    args = parser.parse_args(argv)
    row = measure(args)
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists() or not out.stat().st_size
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"{row['size']} ({row['params_m']:.1f}M, {row['compute_dtype']}): eager {row['eager_s']:.3f} s, compiled "
          f"{row['compiled_s']:.3f} s ({row['saving']:.0%} saved), compiling {row['compile_s']:.1f} s -> pays back "
          f"after {row['payback_steps']:.1f} steps -> {out}")
    return row


if __name__ == "__main__":
    main()
