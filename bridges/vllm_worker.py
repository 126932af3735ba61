"""Our vLLM worker extension (`--worker-extension-cls bridges.vllm_worker.WorkerExtension`).

Runs inside vLLM's worker processes; its methods are called over HTTP with
`POST /collective_rpc {"method": <name>, "kwargs": {...}}`. Importing it makes the worker nap
instead of spinning while it waits for requests (serving/quiet_worker.py); it patches nothing else.
"""

from __future__ import annotations

import datetime
import math
import os

import torch

from serving import quiet_worker

quiet_worker.install()  # imported by vLLM in each worker process, before its queues exist


def weight_group_rank(parallel_config, worker_rank: int, rank_offset: int) -> int:
    """This worker's rank in the trainer's group, numbered as vLLM's NCCL engine numbers them:
    by `data_parallel_index`, because `data_parallel_rank` is reset to 0 in every independent
    (dense-model) DP replica, which would give two replicas one rank."""
    return rank_offset + parallel_config.data_parallel_index * parallel_config.world_size + worker_rank


class CollectiveMixin:
    """mode=broadcast over gloo (bridges/broadcast_gloo.py): join a gloo group with the trainer and
    receive its weights (between separate GPUs vLLM's own NCCL weight-transfer engine does this).

    The trainer is rank 0 and broadcasts flat buckets; each worker unpacks a bucket into named
    tensors and streams them into vLLM's own `reload_weights` (which shards for TP and re-packs
    CPU GEMM weights), so only one bucket is ever held beside the model.
    """

    def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int, timeout_s: float) -> int:
        timeout = datetime.timedelta(seconds=timeout_s)
        rank = weight_group_rank(self.vllm_config.parallel_config, self.rank, rank_offset)
        store = torch.distributed.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        prefix = torch.distributed.PrefixStore("grpo-weights", store)
        self._weight_group = torch.distributed.ProcessGroupGloo(prefix, rank, world_size, timeout)
        return rank

    def receive_weights(self, buckets: list[list[list]]) -> int:
        """`buckets`: per bucket, [name, dtype name, shape] of each tensor, in broadcast order."""
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        received = 0

        def stream():
            nonlocal received
            for bucket in buckets:
                sizes = [math.prod(shape) for _, _, shape in bucket]
                flat = torch.empty(sum(sizes), dtype=getattr(torch, bucket[0][1]))
                self._weight_group.broadcast([flat], opts).wait()
                received += flat.numel() * flat.element_size()
                for (name, _, shape), chunk in zip(bucket, flat.split(sizes)):
                    yield name, chunk.view(shape)

        self.reload_weights(weights_iterator=stream(), is_checkpoint_format=True)
        self.refresh_cpu_weights()
        return received


class SharedWeightsMixin:
    """mode=shared: hand the trainer a handle to every parameter's storage (bridges/shared.py).

    vLLM keeps computing from these very tensors, so the trainer's optimizer step is the sync.
    On CPU that needs `use_plain_linear` first: vLLM's packed GEMM copies would not see the step.
    """

    def use_plain_linear(self) -> int:
        """CPU: make every GEMM layer compute `F.linear` over its real weight; returns how many.

        After loading, vLLM packs each linear weight for oneDNN/sgl and, for `LinearBase`
        layers, replaces `layer.weight` by an empty tensor (the packed copy is all that is
        left). Those weights are re-created at their checkpoint shape (vLLM recorded it on
        `meta` for reloading) and filled from the checkpoint; then `cpu_linear` of every layer,
        the tied lm_head included, becomes a plain `F.linear` over `layer.weight`.
        """
        from vllm.model_executor.model_loader import get_model_loader
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
        from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        model = self.model_runner.model
        layers = [m for m in model.modules() if hasattr(m, "cpu_linear")]
        emptied = [m for m in layers if m.weight.numel() == 0]
        for layer in emptied:
            info = get_layerwise_info(layer)
            with info.restore_device:
                meta = restore_layer_refs(info.restore_metadata[0]["weight"], layer)
                layer.weight = materialize_meta_tensor(meta)
        if emptied:
            loader = get_model_loader(self.vllm_config.load_config)
            model.load_weights(loader.get_all_weights(self.model_config, model))
        for layer in layers:
            bias = getattr(layer, "bias", None)
            if isinstance(bias, torch.Tensor) and bias.dtype != layer.weight.dtype:
                layer.bias.data = bias.to(layer.weight.dtype)  # the sgl path widened it to fp32
            layer.cpu_linear = torch.nn.functional.linear
        return len(layers)

    def export_shared_weights(self) -> dict:
        """Handles of every parameter (tied ones once), and what the trainer must check."""
        from bridges.shared_memory import export_tensor, register_segments

        self.use_plain_linear()
        model = self.model_runner.model
        params = {name: export_tensor(p.data) for name, p in model.named_parameters()}
        register_segments(params.values())  # removed when this worker exits (or by the next start)
        return {
            "params": params,
            "architectures": list(self.model_config.hf_config.architectures or []),
            "tensor_parallel_size": self.parallel_config.tensor_parallel_size,
            "pipeline_parallel_size": self.parallel_config.pipeline_parallel_size,
            **self.device_info(),
        }


class WorkerExtension(CollectiveMixin, SharedWeightsMixin):
    """Mixed into vLLM's Worker: `self.model_runner.model` is the served nn.Module."""

    def device_info(self) -> dict:
        """Where this worker computes; a GPU by UUID, the one name every process agrees on."""
        uuid = str(torch.cuda.get_device_properties(self.device).uuid) if self.device.type == "cuda" else None
        return {"device": str(self.device), "device_uuid": uuid, "pid": os.getpid()}

    def served_dtype(self) -> str:
        """The dtype this worker computes in (`--dtype` resolved), e.g. "bfloat16"."""
        return str(self.model_config.dtype).removeprefix("torch.")

    def refresh_cpu_weights(self) -> int:
        """Re-pack CPU GEMM weights that still hold a stale copy; returns how many were re-packed.

        On CPU, vLLM packs each linear weight for oneDNN/sgl after loading. `reload_weights`
        re-packs the layers it reloads, but a tied lm_head (it shares the embedding's weight and
        is skipped by load_weights) keeps the packed copy of the *old* embedding, so logits
        would come from stale weights. Layers that keep their weight next to a packed copy are
        re-packed from it here.
        """
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        count = 0
        for module in self.model_runner.model.modules():
            weight = getattr(module, "weight", None)
            if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel():
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                count += 1
        return count
