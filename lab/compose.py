"""What a config runs with, decided before anything starts: what trains (`finetune`), how its
weights reach vLLM (`sync`) and on what hardware compose freely, or the run is refused here,
with the sentence the sync's bridge declares for what it cannot do (`Bridge.capabilities`).

`plan(cfg, run_dir)` is everything building a run does before vLLM starts (checks, the bridge,
the server's command line), without starting anything: tests compose every combination with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bridges.base import Bridge, Capabilities
from bridges.shared import physical_cuda_device
from grpo import dynamic_sampling
from grpo.advantages import check_estimator
from runtime import distributed
from runtime.config import max_sampled_tokens, validate
from lab.server import build_server, model_path
from serving.server import VLLMServer, is_loopback


class Refused(ValueError):
    """This finetune x sync x hardware cannot run; the message says why (raised at start)."""


@dataclass
class Plan:
    bridge: Bridge  # built, not set up
    server: VLLMServer  # its command line and environment, not started
    path: str  # the weights vLLM serves and the trainer starts from


def trainer_procs(cfg: DictConfig) -> int:
    """Trainer processes of the whole run: those started (torchrun), or those the hardware asks for."""
    hw = cfg.hardware
    return max(distributed.world_size(), (hw.trainer_procs or 1) * hw.nodes)


def vllm_apart(cfg: DictConfig) -> Optional[str]:
    """Where vLLM computes when not on the trainer's device (GPUs of its own, another machine),
    in words for a refusal; None when it shares the trainer's device (its GPU, or this CPU)."""
    hw, url = cfg.hardware, cfg.server.base_url
    if url and not is_loopback(urlparse(url).hostname or ""):
        return f"vLLM on another machine (server.base_url={url})"
    device = torch.device(hw.device)
    if device.type == "cuda" and hw.vllm_devices is not None \
            and str(hw.vllm_devices).strip() != physical_cuda_device(device):
        return f"vLLM on GPUs of its own (hardware.vllm_devices={hw.vllm_devices})"
    return None


def refusal(capabilities: Capabilities, cfg: DictConfig, procs: int) -> Optional[str]:
    """The first thing of this run the bridge cannot do, as `<what>: <why>`; None if it can all."""
    hw, apart = cfg.hardware, vllm_apart(cfg)
    asks = [
        (capabilities.full if cfg.finetune.name == "full" else capabilities.lora, f"finetune={cfg.finetune.name}"),
        (capabilities.trainer_procs if procs > 1 else None, f"with {procs} trainer processes"),
        (capabilities.async_rollouts if cfg.train.max_staleness else None,
         f"with train.max_staleness={cfg.train.max_staleness}"),
        (capabilities.separate_devices if apart else capabilities.same_device,
         f"with {apart or f'vLLM on the trainer device ({hw.device})'}"),
        (capabilities.vllm_parallel if hw.vllm_tp * hw.vllm_dp > 1 else None,
         f"with vLLM TP={hw.vllm_tp} x DP={hw.vllm_dp}"),
    ]
    return next((f"{what}: {why}" for why, what in asks if why), None)


def check_lora_lr(cfg: DictConfig) -> None:
    """finetune=lora takes the model's own rate (conf/finetune/lora.yaml); a model without one
    would otherwise train LoRA at no rate, or at the full fine-tuning one."""
    if cfg.finetune.name == "lora" and OmegaConf.is_interpolation(cfg.optimizer, "lr") and cfg.model.lora_lr is None:
        raise Refused("finetune=lora: this model has no LoRA learning rate (model.lora_lr); adapters want ~10x "
                      "the full fine-tuning rate, so set model.lora_lr=<rate> in its conf/model/ file or "
                      "optimizer.lr=<rate>")


def check_micro_batches(cfg: DictConfig, procs: int) -> None:
    """A token budget some episode could never fit (its sampled tokens alone exceed it), and the
    chunked head beside FSDP (which gathers the head's shards only inside the model's forward)."""
    budget, most = cfg.train.max_tokens_per_micro_batch, max_sampled_tokens(cfg.rollout)
    if budget is not None and budget <= most:
        raise Refused(f"train.max_tokens_per_micro_batch={budget} does not hold the {most} tokens an episode may "
                      f"sample (rollout.max_tokens x rollout.max_turns, within rollout.max_total_tokens) plus its "
                      f"prompt: raise it above {most}, or null for row-count micro-batches")
    if cfg.train.logprob_chunk_tokens is not None and procs > 1:
        raise Refused(f"train.logprob_chunk_tokens={cfg.train.logprob_chunk_tokens} with {procs} trainer processes: "
                      "FSDP gathers the LM head only inside the model's forward, and the chunked head runs "
                      "outside it; set train.logprob_chunk_tokens=null")


def check(cfg: DictConfig, procs: Optional[int] = None) -> Bridge:
    """Every check that needs nothing started, then the sync's bridge, or `Refused` saying why."""
    check_lora_lr(cfg)
    validate(cfg)  # every range and choice, by its key, before anything starts
    check_micro_batches(cfg, procs or trainer_procs(cfg))
    check_estimator(cfg.advantage.estimator, cfg.advantage.scale_rewards)  # e.g. reinforce_pp has no group std
    dynamic_sampling.check(cfg.train.dynamic_sampling, cfg.train.max_sampling_rounds, cfg.train.prompts_per_step,
                           cfg.train.group_size, cfg.rollout.max_turns)  # every round's (and turn's) seeds fit in its step's
    if cfg.finetune.name == "lora" and cfg.finetune.lora is None:
        raise Refused("finetune=lora needs finetune.lora (its settings; conf/finetune/lora.yaml sets them)")
    # Its own arguments fail here, by name; every bridge is verified (VerifiedBridge).
    bridge: Bridge = instantiate(cfg.sync.bridge, probe_tolerance=cfg.sync.probe_tolerance)
    why = refusal(type(bridge).capabilities, cfg, procs or trainer_procs(cfg))
    if why:
        raise Refused(f"sync={cfg.sync.name} cannot run {why}")
    return bridge


def plan(cfg: DictConfig, run_dir: Optional[Path], path: Optional[str] = None, procs: Optional[int] = None) -> Plan:
    """Everything building the run decides before vLLM starts, nothing started: a config that
    cannot run fails here. `path`: the model's (default: built or named by `model`)."""
    bridge = check(cfg, procs)
    path = path or model_path(cfg)
    server = build_server(cfg, run_dir, bridge=bridge, model=path)
    return Plan(bridge, server, path)
