"""GRPO's algorithm: the data it works on, advantages, losses, the policy's maths, seeds. It reads
no config and starts no process, so every part is built and tested from plain values.
`REPO_ROOT` is where the repository's root is named, once: relative data paths, the tiny-model
cache and vLLM's worker imports start from it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
