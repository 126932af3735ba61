"""Helpers the tests share (not a test module: tests import helpers from here or from conftest.py,
never from one another; tests/test_imports.py checks it).

Run presets (QUIET, SHORT_RUN), a Run whose rollouts need no server (serverless_run), a trainer
process killed mid-run (start_trainer_and_kill), a client scripting multi-turn episodes
(ScriptedClient), the probe the bridges and final/ are checked on
(probe_ids, hf_probe, max_diff, the spy_final fixture), and an adapter moved off its init
(bump_adapter).
"""

from __future__ import annotations

import ast

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bridges.base import SyncStats
from conftest import REPO
from envs.synthetic import DigitsEnv
from grpo.data import Completion
from hydra.utils import instantiate

from lab.episodes import OneTurn
from lab.sampler import Sampler
from runtime.async_rollout import InlineRollouts
from grpo.policy import Policy, token_logprobs
from lab import final
from lab.run import Run
from runtime.logger import RunLogger
from runtime.procfs import PGRP, PPID, stat_fields
from serving.guard import RestartGuard
from serving.lifeline import group_members
from serving.server import VLLMServer

QUIET = ("log.wandb.mode=disabled", "log.progress=false", "train.prompts_per_step=2", "train.group_size=4",
         "rollout.max_tokens=8")
SHORT_RUN = ("train.steps=30", "log.wandb.mode=offline", "log.progress=false", "log.samples_every=10")


def assert_learns(history, gain=0.15):
    first = sum(m["reward_mean"] for m in history[:5]) / 5
    last = sum(m["reward_mean"] for m in history[-5:]) / 5
    assert last > first + gain, f"reward {first:.3f} -> {last:.3f}"


# -- a run without a server ---------------------------------------------------------------------

class FakeClient:
    """Samples random token ids so train_step runs without a server."""

    logprob = -1.0  # vLLM's logprob of every sampled token

    def generate(self, prompt_ids, n, seed=None):
        g = torch.Generator().manual_seed(seed)
        return [[Completion(torch.randint(10, 200, (4,), generator=g).tolist(), [self.logprob] * 4, "12ab", "length")
                 for _ in range(n)] for _ in prompt_ids]


class ScriptedClient:
    """Every episode's turn k is script[k] = (text, ends with EOS); a turn longer than its cap is
    cut there (finish `length`), as vLLM does. Records each request's seeds and caps."""

    max_tokens = 16

    def __init__(self, tokenizer, script: list[tuple[str, bool]]):
        self.tokenizer, self.script, self.requests = tokenizer, script, []

    def _turn(self, k: int, cap: int) -> Completion:
        text, eos = self.script[min(k, len(self.script) - 1)]
        ids = self.tokenizer(text, add_special_tokens=False).input_ids + ([self.tokenizer.eos_token_id] if eos else [])
        finish = "length" if len(ids) > cap else "stop"
        ids = ids[:cap]
        return Completion(ids, [-0.25 - 0.01 * i for i in range(len(ids))], self.tokenizer.decode(ids), finish)

    def generate(self, prompt_ids, n, seed=None, stop_token_ids=()):
        self.requests.append(("first", seed, None))
        return [[self._turn(0, self.max_tokens) for _ in range(n)] for _ in prompt_ids]

    def continue_each(self, prompt_ids, seeds, max_tokens, stop_token_ids=()):
        k = sum(kind == "next" for kind, *_ in self.requests) + 1
        self.requests.append(("next", seeds, max_tokens))
        return [self._turn(k, cap) for cap in max_tokens]


class FakeBridge:
    def step_context(self):
        return contextlib.nullcontext()

    def sync(self, step):
        return SyncStats(step, "full", "fake", 0.0, 0, 0.0, 0.0)


def serverless_run(tmp_path, tiny_model_path, cfg) -> Run:
    """A Run whose rollouts come from FakeClient: train_step runs without vLLM."""
    policy = Policy(tiny_model_path)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    attached = VLLMServer("m", args=[], env={}, log_path=tmp_path / "vllm.log", base_url="http://127.0.0.1:9")
    env, client, guard = DigitsEnv(), FakeClient(), RestartGuard(attached, "m", resync=lambda step: None)
    overlong = instantiate(cfg.overlong, default_length=cfg.rollout.max_tokens)
    sample = Sampler(env, OneTurn(env, policy.encode_chat), client, guard, overlong, cfg.train)
    return Run(cfg=cfg, run_dir=tmp_path, precision=policy.precision, env=env, policy=policy, server=attached,
               client=client, bridge=FakeBridge(), optimizer=optimizer,
               loss=instantiate(cfg.loss, max_completion_length=cfg.rollout.max_tokens),
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
               logger=RunLogger(tmp_path, cfg, total_steps=2), guard=guard, sampler=sample,
               rollouts=InlineRollouts(sample),
               evaluator=None)


# -- the trainer killed: its vLLM goes with it ----------------------------------------------------

def server_group(trainer_pid: int) -> int | None:
    """The process group of the server the trainer started: its child that leads a group."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = stat_fields(entry)
        if fields is not None and int(fields[PPID]) == trainer_pid and int(fields[PGRP]) == int(entry):
            return int(entry)
    return None


def start_trainer_and_kill(run_dir: Path, sig: int, *overrides: str) -> tuple[int, list[int], float, float]:
    """Start `python train.py` (owning its vLLM), send `sig` once it has trained a step; returns its
    exit code, the server's pids (lifeline, API server, engine core, worker), and the seconds from
    the signal until the trainer was gone and until the server was."""
    proc = subprocess.Popen([sys.executable, "train.py", *QUIET, "train.steps=40", f"hydra.run.dir={run_dir}",
                             *overrides], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 900  # a vLLM start took 6 min on this machine under load
    while not (metrics.exists() and metrics.read_text()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    pgid = server_group(proc.pid)
    trained = metrics.exists() and metrics.read_text()
    assert trained and pgid is not None and proc.poll() is None, "the trainer did not train with its own server"
    pids = sorted({pgid, *group_members(pgid)})
    proc.send_signal(sig)
    t = time.monotonic()
    code = proc.wait(timeout=120)
    trainer_s = time.monotonic() - t
    while group_members(pgid) and time.monotonic() - t < 120:
        time.sleep(0.1)
    return code, pids, trainer_s, time.monotonic() - t


# -- the probe the trainer's, vLLM's and HF's logprobs are compared on ---------------------------

HF_TOL = 1e-4  # the same HF model and kernels on both sides: measured 0 in fp32


def probe_ids(policy: Policy) -> list[int]:
    """The bridges' probe (bridges/base.py): a chat prompt and a fixed answer."""
    answer = policy.tokenizer("6 times 7 is 42.", add_special_tokens=False).input_ids
    return policy.encode_chat([{"role": "user", "content": "What is 6 times 7?"}]) + answer


def hf_probe(path, ids: list[int]) -> list[float]:
    """Logprobs of ids[1:] from the model `from_pretrained` loads from `path` (fp32)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        return token_logprobs(model, tokens, torch.ones_like(tokens), 1)[0].tolist()


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def spy_final(monkeypatch) -> dict:
    """The real `final.save` that train() calls, recording the trainer's probe logprobs (and the
    probe) at the moment it saves: what final/ must reproduce."""
    seen, save = {}, final.save

    def recording_save(policy, run_dir, **kwargs):
        seen["ids"] = probe_ids(policy)
        seen["trainer"] = policy.probe_logprobs(seen["ids"])
        seen["dir"] = save(policy, run_dir, **kwargs)
        return seen["dir"]

    monkeypatch.setattr(final, "save", recording_save)
    return seen


def bump_adapter(policy: Policy, seed: int) -> None:
    """Like a few optimizer steps on the adapter: B moves away from its zero init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, at any depth (imports inside functions too);
    `from . import x` gives "x"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += ([(node.lineno, node.module)] if node.module else
                      [(node.lineno, alias.name) for alias in node.names])
    return found
