"""Many trainer processes: `torchrun --nproc_per_node=N train.py ...` (or N SLURM/submitit tasks).

The design (one process = world size 1 changes nothing; every helper here is then a no-op):
- rank 0 alone talks to vLLM: it generates and scores the step's rollout and broadcasts it, so
  vLLM sees one client and the same seeded requests as a one-process run (each rank asking vLLM's
  DP for its share would split prompt groups or need a second client protocol, for no gain: one
  HTTP client already keeps a TP x DP server busy, since vLLM batches the n x P sequences itself);
- every rank computes the advantages of the whole step (GRPO's group statistics come before the
  split), then trains its contiguous share of the rows; the losses are normalised by the whole
  step's rows and tokens, and gradients are summed across ranks, so N processes compute the
  one-process gradient;
- full fine-tuning shards the model with FSDP2 (`fully_shard` per decoder layer + root, summed
  reduce-scatter); LoRA keeps the model replicated (sharding a few MB of adapters buys nothing)
  and sums the adapter gradients with one all-reduce per optimizer step (DDP's no_sync + final
  sync, without DDP's forward wrapper, which PEFT's disable_adapter reference and the probe
  bypass);
- weights reach vLLM from the shards bucket by bucket (`gather_to_main`), rank 0 pushes; rank 0
  writes the run dir, logs and checkpoint markers (checkpoint.py writes DCP shards from every rank).
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process talks to vLLM and writes the run's outputs (rank 0)."""
    return rank() == 0


def launch_rank() -> int:
    """This process's rank as its launcher set it, before any process group exists: torchrun's
    RANK, else submitit's task rank (SLURM or local; `init` exports RANK from it), else 0."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

        return submitit.JobEnvironment().global_rank
    return 0


def _export_submitit_env() -> None:
    """A SLURM/submitit job with several tasks: the env:// variables torchrun would have set."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        # Every task keeps all of the node's GPUs visible: rank 0 starts vLLM on the others.
        env.export(set_cuda_visible_devices=False)


def init(configured_device: str, timeout_s: float = 1800.0) -> None:
    """Join the process group when started as several processes: NCCL between GPUs, gloo on CPU."""
    _export_submitit_env()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    cuda = configured_device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if cuda:
        torch.cuda.set_device(device(configured_device))


def device(configured: str) -> str:
    """This rank's trainer device: with several processes, `cuda[:i]` is cuda:<local rank>."""
    if world_size() == 1 or not configured.startswith("cuda"):
        return configured
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key summed over ranks (every rank passes the same keys)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"  # NCCL: GPU only
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=on)
    dist.all_reduce(total)
    return dict(zip(keys, total.tolist()))


def agree_run_dir(run_dir: Path) -> Path:
    """Rank 0's run dir on every rank. Hydra makes one per process from the clock, so a rank
    that started a second later made its own: removed while it holds only Hydra's own files."""
    agreed = Path(broadcast_object(str(run_dir)))
    if agreed != run_dir and run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log"
                                                      for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
    return agreed


def check_rows(rows: int) -> None:
    """Every rank trains the same number of rows: FSDP's collectives run once per micro-batch on
    every rank, so unequal shares would deadlock."""
    if rows % world_size():
        raise ValueError(f"train.prompts_per_step * train.group_size = {rows} rows do not split evenly over "
                         f"{world_size()} trainer processes")


def shard_rows(rows: int) -> slice:
    """This rank's contiguous share of a step's `rows`."""
    share = rows // world_size()
    return slice(rank() * share, (rank() + 1) * share)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over `model` in place: one unit per decoder layer (the classes HF lists in
    `_no_split_modules`) plus the root, which holds the embeddings and the head (tied ones stay
    tied). Gradients are summed over ranks, not averaged: the losses are already normalised by
    the whole step, so the sum is the one-process gradient."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free the unsharded parameters a forward without backward left behind. FSDP2 never
    reshards the root after its forward (backward would need them at once); after a no-grad
    forward (the probe, old/reference logprobs) the root would then stay unsharded, and the next
    training forward would compute with, and put its gradients on, those stale full copies
    instead of the shards the optimizer steps (measured: embeddings, final norm and head never
    moved)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def sum_replicated_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of replicated (non-FSDP) parameters over ranks: one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p, DTensor)]
    if world_size() == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` on the global norm: over FSDP's DTensor shards it is computed across
    ranks; replicated gradients are already the summed ones. A plain tensor on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every rank must call it, in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# How much of a sharded model a weight sync or final save gathers at a time.
GATHER_BUCKET_BYTES = 256 << 20


def buckets(named: dict[str, torch.Tensor], bucket_bytes: int) -> list[dict[str, torch.Tensor]]:
    """`named` in buckets of one dtype of about `bucket_bytes` each (a tensor never splits; a
    flat collective moves one dtype), from names, dtypes and global shapes alone: nothing is
    gathered. bucket_bytes <= 0 gives one tensor per bucket."""
    by_dtype: dict[torch.dtype, list] = defaultdict(list)
    for name, t in named.items():
        by_dtype[t.dtype].append((name, t))
    out: list[dict[str, torch.Tensor]] = []
    for group in by_dtype.values():
        current, size = {}, 0
        for name, t in group:
            if current and size + t.numel() * t.element_size() > bucket_bytes:
                out.append(current)
                current, size = {}, 0
            current[name] = t
            size += t.numel() * t.element_size()
        out.append(current)
    return out


def gathered(plan: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Each bucket of `plan` as full tensors: each DTensor shard is all-gathered (`full_tensor()`,
    a collective: every rank iterates in step), so no rank holds more of the unsharded model than
    one bucket. Plain tensors pass through."""
    for bucket in plan:
        yield {name: full(t).detach() for name, t in bucket.items()}


def gather_to_main(plan: list[dict[str, torch.Tensor]], consume: Callable[[dict[str, torch.Tensor]], int]) -> int:
    """The one way a (possibly sharded) model reaches rank 0 bucket by bucket: every rank gathers
    each bucket of `plan` in turn, rank 0 hands it to `consume` (which returns the bytes it
    wrote or sent), the others drop theirs. Rank 0's total, 0 on the others."""
    done = 0
    for bucket in gathered(plan):
        if is_main():
            done += consume(bucket)
    return done


def full_buckets(state_dict: dict[str, torch.Tensor], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """`state_dict` as full tensors, about `bucket_bytes` of one dtype at a time (`gathered`)."""
    return gathered(buckets(state_dict, bucket_bytes))


def required_devices(trainer_procs: int, vllm_tp: int, vllm_dp: int, vllm_devices: Optional[str]) -> int:
    """GPUs one node needs: a trainer process each, plus vLLM's TP x DP when it has its own
    (`vllm_devices` set); otherwise vLLM shares the trainer's first GPU."""
    return trainer_procs + (vllm_tp * vllm_dp if vllm_devices is not None else 0)


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def check_devices(hw, available: int) -> None:
    """A layout that needs more GPUs per node than the node has fails at start, saying how many
    (`available`: torch.cuda.device_count(), a parameter so the check is testable anywhere)."""
    if not str(hw.device).startswith("cuda"):
        return
    procs = hw.trainer_procs or local_world_size()
    need = required_devices(procs, hw.vllm_tp, hw.vllm_dp, hw.vllm_devices)
    if need > available:
        raise ValueError(f"hardware: {procs} trainer process(es) + vLLM TP {hw.vllm_tp} x DP {hw.vllm_dp}"
                         f"{' on its own GPUs' if hw.vllm_devices is not None else ''} need {need} GPUs per node; "
                         f"this node has {available}")
