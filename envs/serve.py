"""`python -m envs.serve env=<name> [server.port=8100] [server.host=...] [server.api_key=...]`:
serve one of our envs over HTTP (envs/service.py), built from the same `conf/env/` group and
overrides `train.py` takes, for trainers that use it with `env=remote env.url=<its URL>`.

    python -m envs.serve env=reasoning_gym env.task=basic_arithmetic server.port=8100
    python train.py env=remote env.url=http://127.0.0.1:8100

The env's seed is `train.seed`, as in a run. A host other than loopback needs `server.api_key`
(every route but /health then requires it). Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig

from envs.episode import is_multi_turn
from envs.service import build_app
from grpo import REPO_ROOT
from serving.server import is_loopback


@dataclass
class ServiceServerConfig:
    host: str = "127.0.0.1"
    port: int = 8100
    api_key: Optional[str] = None
    log_level: str = "warning"  # uvicorn's: one line per request at "info"


@dataclass
class SeedConfig:
    seed: int = 0  # what the env YAMLs read as ${train.seed}


@dataclass
class EnvServiceConfig:
    env: Any = MISSING
    server: ServiceServerConfig = field(default_factory=ServiceServerConfig)
    train: SeedConfig = field(default_factory=SeedConfig)
    model: Any = None  # what a `# @package _global_` env sets for the trainer's model (env=calc's tokenizer corpus): unused here


ConfigStore.instance().store(name="env_service_schema", node=EnvServiceConfig)


def check_host(host: str, api_key: Optional[str]) -> None:
    if not api_key and not is_loopback(host):
        raise ValueError(f"server.host={host} makes the env service reachable from other machines: set "
                         "server.api_key=<key> (every route but /health then requires it; the trainer sets "
                         "env.api_key to the same), or keep server.host=127.0.0.1.")


@hydra.main(config_path="../conf", config_name="env_service", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import uvicorn

    check_host(cfg.server.host, cfg.server.api_key)
    name = HydraConfig.get().runtime.choices.get("env", "env")
    env = instantiate(cfg.env)  # a bad option or missing data fails here, before the port opens
    try:
        key = " env.api_key=<key>" if cfg.server.api_key else ""
        budget = "".join(f" env.{k}={getattr(env, k)}" for k in ("max_turns", "max_total_tokens")) \
            if is_multi_turn(env) else ""
        print(f"env service {name!r} at http://{cfg.server.host}:{cfg.server.port}. Train with:\n"
              f"  python train.py env=remote env.url=http://{cfg.server.host}:{cfg.server.port} "
              f"env.max_tokens={env.max_tokens}{budget}{key}", flush=True)
        uvicorn.run(build_app(env, name, cfg.server.api_key), host=cfg.server.host, port=cfg.server.port,
                    log_level=cfg.server.log_level)
    finally:
        env.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(*overrides: str, port: int, timeout_s: float = 60.0) -> subprocess.Popen:
    """`python -m envs.serve <overrides> server.port=<port>` as a subprocess, answering /health."""
    import requests

    proc = subprocess.Popen([sys.executable, "-m", "envs.serve", f"server.port={port}", *overrides], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"env service exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"env service {overrides} did not answer /health in {timeout_s:.0f} s")


@contextlib.contextmanager
def served(*overrides: str, port: Optional[int] = None) -> Iterator[str]:
    """An env service subprocess on loopback for as long as the block runs; yields its URL."""
    port = port or free_port()
    proc = spawn(*overrides, port=port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
