"""What a row says about the model: from the config (known even when the point fails) and from
the loaded weights (parameter count)."""

from __future__ import annotations

from omegaconf import DictConfig


def config_columns(cfg: DictConfig) -> dict:
    tiny = cfg.model.tiny
    return {"model": "tiny" if tiny is not None else cfg.model.path,
            "hidden_size": tiny.hidden_size if tiny is not None else None}


def weight_columns(model) -> dict:
    return {
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
