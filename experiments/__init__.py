"""Throughput studies: Hydra multirun benchmarks that append one CSV row per grid point.

    python -m experiments.rollout_throughput -m bench=rollout_throughput
    python -m experiments.sync_latency -m bench=sync_latency
    python -m experiments.step_time -m bench=step_time               # our GRPO step vs TRL's (bench extra)
    python -m experiments.plot multirun/<sweep>/rollout_throughput.csv
"""
