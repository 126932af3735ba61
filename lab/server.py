"""The one place a vLLM server is assembled from config: train.py's run, `python -m lab.serve`,
`python -m lab.evaluate`, the tests' session server and the benchmarks all call `vllm_server`.
What a sync needs of the server (LoRA flags, eager mode, NCCL) comes from its bridge.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from grpo.precision import dtype_name, served_dtype
from runtime.tiny_model import build_tiny_model
from runtime.config import EPISODE_KEYS
from serving.client import VLLMClient
from serving.server import VLLMServer, cpu_binding


def base_model_path(cfg) -> str:
    """The model before any warm start: the locally built tiny model, or `model.path` (a hub id
    or a local dir)."""
    if cfg.model.tiny is not None:
        return str(build_tiny_model(OmegaConf.to_object(cfg.model.tiny)))
    if not cfg.model.path:
        raise ValueError("set model.path (hub id or local dir) or model.tiny")
    return cfg.model.path


def model_path(cfg) -> str:
    """The weights vLLM serves and the trainer starts from: the base model, or with
    `model.warm_start` the base after its supervised warm start (built once and cached, lab/sft.py)."""
    base = base_model_path(cfg)
    if cfg.model.warm_start is None:
        return base
    from lab.sft import sft_precision, warm_start  # the warm start trains: loaded only where one is asked for

    return str(warm_start(base, cfg.model.warm_start, sft_precision(cfg.model, cfg.hardware), cfg.hardware.device))


def served_dtype_name(cfg, server: VLLMServer) -> str:
    """`model.dtype` as served: for a server we start, `auto` resolved on hardware.device; an
    attached server is asked, and `auto` takes what it serves (an explicit dtype must match it)."""
    if not server.external:
        return dtype_name(served_dtype(cfg.model.dtype, cfg.hardware.device))
    server.start()  # waits until it answers
    actual = server.served_dtype()
    if cfg.model.dtype not in ("auto", actual):
        raise ValueError(f"model.dtype={cfg.model.dtype}, but the server at {server.base_url} serves {actual}: "
                         f"set model.dtype={actual} or auto, or start the server with model.dtype={cfg.model.dtype}")
    return actual


def build_server(cfg, run_dir: Optional[Path], *, bridge=None, model: Optional[str] = None,
                extra_args: tuple[str, ...] = ()) -> VLLMServer:
    """The vLLM server of this config (not started): `model` (default: the config's, the tiny one
    built on first use) with the `model`, `hardware` and `server` groups' flags, what the sync's
    `bridge` needs of the server (`Bridge.server_args()`/`server_env()`), then `extra_args`.
    vLLM logs to `<run_dir>/vllm.log`, or to our stdout without a run dir."""
    hw, srv = cfg.hardware, cfg.server
    extra_env = bridge.server_env() if bridge is not None else {}
    extra_args = (*(bridge.server_args() if bridge is not None else ()), *extra_args)
    args = [
        "--served-model-name", cfg.model.served_name,
        "--dtype", dtype_name(served_dtype(cfg.model.dtype, hw.device)),
        "--max-model-len", str(cfg.model.max_model_len),
        "--gpu-memory-utilization", str(hw.gpu_memory_utilization),
        "--tensor-parallel-size", str(hw.vllm_tp),
        "--data-parallel-size", str(hw.vllm_dp),
        "--max-num-seqs", str(hw.max_num_seqs),
        "--seed", str(cfg.train.seed),
        # Sampled logprobs after temperature, as the trainer computes them.
        "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", "bridges.vllm_worker.WorkerExtension",
        *(["--kv-cache-memory-bytes", str(int(hw.kv_cache_gb * 2**30))] if hw.kv_cache_gb else []),
        *hw.server_args,
        *extra_args,
        *srv.extra_args,  # the user's, last
    ]
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if (hw.vllm_cpus or hw.vllm_tp * hw.vllm_dp > 1) and not torch.cuda.is_available():
        cpus = sorted(hw.vllm_cpus or os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(hw.vllm_tp * hw.vllm_dp, cpus)
    env.update({**hw.server_env, **extra_env})  # explicit settings win
    if hw.vllm_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = hw.vllm_devices
    return VLLMServer(
        model or model_path(cfg),
        args=args,
        env=env,
        log_path=run_dir / "vllm.log" if run_dir else None,
        host=srv.host,
        port=srv.port,
        base_url=srv.base_url,
        api_key=srv.api_key,
        startup_timeout_s=srv.startup_timeout_s,
        deadlines=OmegaConf.to_object(srv.deadlines),
        cpus=None if torch.cuda.is_available() else hw.vllm_cpus,
    )


def build_client(cfg, server: VLLMServer, model: Optional[str] = None) -> VLLMClient:
    """The rollout client of this config on `server`, asking for `model` (default: the served
    name). `rollout.max_turns` / `max_total_tokens` are the episode loop's (lab/episodes.py), not
    the client's; the rest is resolved first, where `env.max_tokens` is in reach."""
    rollout = OmegaConf.to_container(cfg.rollout, resolve=True)
    return instantiate({k: v for k, v in rollout.items() if k not in EPISODE_KEYS}, server=server,
                       model=model or cfg.model.served_name)
