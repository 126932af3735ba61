"""`python -m lab.serve [overrides]`: a vLLM server for trainers that attach to it (the
analogue of `trl vllm-serve`), built from the same config groups as train.py, so it gets the flags
the trainer would give a server of its own: our worker extension, the sync's flags and
environment (LoRA, NCCL weight transfer, eager mode for shared), hardware's TP/DP.

    python -m lab.serve sync=broadcast server.host=0.0.0.0 server.port=8000 server.api_key=$KEY
    python train.py sync=broadcast server.base_url=http://<that host>:8000 server.api_key=$KEY

A host other than loopback needs `server.api_key` (every route but /health then requires it).
vLLM logs to the terminal; Ctrl-C or SIGTERM stops it with all its processes.
"""

from __future__ import annotations

import socket

import hydra
from omegaconf import DictConfig

from lab.compose import check
from runtime.config import register_configs
from serving.lifeline import exit_on_sigterm
from lab.server import build_server

register_configs()
DEFAULT_PORT = 8000  # vLLM's own default


def attach_url(host: str, port: int) -> str:
    """The base_url a trainer on another machine uses (a wildcard bind is reached by name)."""
    return f"http://{socket.getfqdn() if host in ('0.0.0.0', '::', '') else host}:{port}"


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.server.base_url:
        raise ValueError(f"server.base_url={cfg.server.base_url}: serve starts a server, it does not attach; "
                         "set server.host / server.port instead")
    cfg.server.port = cfg.server.port or DEFAULT_PORT
    bridge = check(cfg)  # its flags; a finetune x sync x hardware it cannot serve is refused
    server = build_server(cfg, None, bridge=bridge)
    with exit_on_sigterm(), server:
        key = " server.api_key=<key>" if cfg.server.api_key else ""
        print(f"vLLM serves {server.model} at {server.base_url}. Attach with:\n"
              f"  python train.py finetune={cfg.finetune.name} sync={cfg.sync.name} server.base_url={attach_url(server.host, server.port)}{key}",
              flush=True)
        try:
            code = server.proc.wait()  # until vLLM exits, Ctrl-C or SIGTERM
        except KeyboardInterrupt:
            return
    raise SystemExit(f"vLLM exited by itself with code {code}")


if __name__ == "__main__":
    main()
