"""GRPO: configs, maths, policy, run records. `REPO_ROOT` is where the repository's root is named,
once: relative data paths, the tiny-model cache and vLLM's worker imports start from it."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
