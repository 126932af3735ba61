"""Shared fixtures: the real composed config, the tiny model, and ONE real vLLM server per session.

Starting vLLM on CPU takes ~1 min, so tests that only need "a server with the tiny model" attach
to the session server (`server.base_url=...`); every bridge verifies (and if needed re-syncs)
the served weights at start, so tests stay independent of each other's weight changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir

from serving.server import VLLMServer
from grpo import REPO_ROOT
from runtime.config import register_configs
from grpo.precision import Precision

REPO = REPO_ROOT
os.environ.setdefault("WANDB_SILENT", "true")
register_configs()


def make_cfg(*overrides: str):
    """The config `python train.py <overrides>` would run with (Hydra resolvers included)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from lab.server import model_path

    return model_path(make_cfg())


@pytest.fixture(scope="session")
def calc_model_path() -> str:
    """The tiny model `env=calc` trains: its tokenizer knows `<calc>` and `</calc>` as single tokens."""
    from lab.server import model_path

    return model_path(make_cfg("env=calc"))


@pytest.fixture(scope="session")
def vllm_server(tiny_model_path, tmp_path_factory):
    """A real vLLM server on the tiny model, LoRA enabled so the LoRA tests can share it. It serves
    fp32 on every CPU (the bridges' exact checks); a run attached to it with model.dtype=auto
    takes that dtype from it (lab/server.py served_dtype_name)."""
    from bridges.lora import LoraBridge
    from lab.server import build_server

    lora = LoraBridge()  # the flags and environment mode=lora starts its server with
    server = build_server(make_cfg("mode=reload", "model.dtype=float32"), tmp_path_factory.mktemp("vllm"), bridge=lora,
                      model=tiny_model_path)
    server.start()
    yield server
    server.stop()


# A short seeded run whose per-step numbers tests compare with the straight run's (resumed, its
# vLLM hung), fp32 on both sides (hardware.autocast=null).
SEEDED = ("log.wandb.mode=disabled", "log.progress=false", "train.prompts_per_step=2", "train.group_size=4",
          "train.checkpoint_every=3", "rollout.max_tokens=8", "model.dtype=float32", "hardware.autocast=null")
_straight_runs: dict[tuple[str, ...], list[dict]] = {}


def straight_run(tmp_path_factory, *overrides: str) -> list[dict]:
    """The per-step metrics of `train(overrides)`, run once per session: the tests that compare a
    disturbed run (resumed, its vLLM hung) with the undisturbed one share it."""
    if overrides not in _straight_runs:
        from lab.loop import train

        _straight_runs[overrides] = train(make_cfg(*overrides), tmp_path_factory.mktemp("straight"))
    return _straight_runs[overrides]


@pytest.fixture
def attach(vllm_server: VLLMServer, tiny_model_path) -> str:
    """Override that makes a train() run use the session server, on the tiny model's own weights
    (a LoRA run needs the base under its adapter; an earlier full-weight run changed it)."""
    restore_pristine(vllm_server, tiny_model_path)
    return f"server.base_url={vllm_server.base_url}"


@contextlib.contextmanager
def loopback_http(handler) -> Iterator[str]:
    """A real HTTP server answering with `handler` (a BaseHTTPRequestHandler whose class attribute
    `release`, a threading.Event, unblocks requests it holds) on loopback; yields its URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    handler.release.clear()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        handler.release.set()
        httpd.shutdown()


def run_precision(run_dir) -> Precision:
    """The precision a run trained and served in, from its `precision` event: what its trainer-vs-
    vLLM numbers are compared with (`gap_tolerance`, `probe_tolerance`, `rtol`)."""
    events = [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]
    return Precision.from_dict(next(e for e in events if e["event"] == "precision"))


# Probe tolerance of the bridge tests: max |logprob_vllm - logprob_trainer| after a sync (fp32 on
# both sides; measured ~1e-6), while the change a sync must carry is > 1e-2.
PROBE_TOL = 1e-3


def perturb(policy) -> None:
    """A weight change like an optimizer step's, on every tensor incl. the tied embedding."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def restore_pristine(server, model_path: str) -> None:
    """Put the session server back on the tiny model's own weights for the tests after."""
    server.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": model_path}})
    server.post("/collective_rpc", {"method": "refresh_cpu_weights"})
