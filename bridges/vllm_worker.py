"""Our vLLM worker extension (`--worker-extension-cls bridges.vllm_worker.WorkerExtension`).

Runs inside vLLM's worker processes; its methods are called over HTTP with
`POST /collective_rpc {"method": <name>, "kwargs": {...}}`. It patches nothing in vLLM.
"""

from __future__ import annotations

import torch


class WorkerExtension:
    """Mixed into vLLM's Worker: `self.model_runner.model` is the served nn.Module."""

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
