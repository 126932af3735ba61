"""mode=shared: trainer and vLLM hold ONE copy of the weights.

Proved on CPU against a real vLLM server of its own (shared mode writes the served weights in
place, so the session server is left alone): the trainer's parameters live in the shared-memory
files vLLM computes from, attaching adds no private copy to the trainer's memory, and after an
optimizer step vLLM's probe logprobs equal the trainer's (fp32 both sides, <= 1e-3; measured
~1e-6) although no weight-transfer call was made. Then `train()` with mode=shared learns.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lab.server import build_server
from bridges.names import FUSED, NameMapError, hf_views, name_map
from bridges.shared import SharedBridge, SharedWeightsError, attach, check_worker, meta_model
from bridges.shared_memory import SHM, remove_stale, segment_name
from conftest import REPO, make_cfg, run_precision
from lab import final
from grpo.policy import Policy, token_logprobs
from serving.client import VLLMClient
from runtime.records import read_jsonl
from support import HF_TOL, QUIET, SHORT_RUN, assert_learns, hf_probe, max_diff, probe_ids, start_trainer_and_kill
from support import spy_final  # noqa: F401 (a fixture)
from lab.loop import train
from lab.server import model_path

TOL = 1e-3
# fp32 on every CPU (model.dtype=auto would serve bf16, pure, where it is native): these tests check
# exact agreement and fp32 memory; shared in bf16 is tests/test_bf16.py's.
FP32 = "model.dtype=float32"
# A tiny-model variant big enough (~44 MB fp32) that a copy of it shows in the process's memory.
BIG = ("model.tiny.hidden_size=512", "model.tiny.intermediate_size=1024", "model.tiny.num_hidden_layers=4",
       "model.tiny.num_attention_heads=8", "model.tiny.num_key_value_heads=8")


def memory_kb() -> dict[str, int]:
    """Resident memory of this process by kind: private (RssAnon) and shared-memory (RssShmem).

    Freed heap pages are returned first (malloc_trim), else a new copy could hide in them."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssShmem", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def mapped_file(pid: int | str, address: int) -> str | None:
    """The file mapped at `address` in process `pid` (from /proc/<pid>/maps)."""
    for line in open(f"/proc/{pid}/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= address < hi:
            return parts[5] if len(parts) > 5 else None
    return None


def vllm_layout(model) -> dict[str, torch.Tensor]:
    """An HF Qwen2's weights as vLLM names and fuses them (q/k/v and gate/up stacked, vocab padded)."""
    sd = {k: v.detach().clone() for k, v in model.named_parameters()}
    served = {}
    for name, tensor in sd.items():
        prefix, _, leaf = name.rpartition(".")
        parent, _, module = prefix.rpartition(".")
        fused = next((f for f, parts in FUSED.items() if module in parts), None)
        if module in ("embed_tokens", "lm_head"):
            served[name] = torch.cat([tensor, torch.zeros(64, tensor.shape[1])])
        elif fused is None:
            served[name] = tensor
        elif module == FUSED[fused][0]:
            served[f"{parent}.{fused}.{leaf}"] = torch.cat([sd[f"{parent}.{p}.{leaf}"] for p in FUSED[fused]])
    return served


@pytest.mark.parametrize("tied", [True, False])
def test_views_of_fused_tensors_compute_the_hf_model(tiny_model_path, tied):
    """No vLLM: a meta-built model attached to vLLM-layout tensors computes what the HF model does,
    and writes through its k_proj / up_proj / lm_head land in the fused (or tied) tensors."""
    config = AutoConfig.from_pretrained(tiny_model_path, tie_word_embeddings=tied)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    served = vllm_layout(reference)
    assert ("lm_head.weight" in served) != tied
    model = meta_model(config, "float32", torch.device("cpu"))
    attach(model, hf_views(served, {n: p.shape for n, p in model.named_parameters()}, name_map(config)))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    layer = model.model.layers[1]
    q_rows = layer.self_attn.q_proj.weight.shape[0]
    gate_rows = layer.mlp.gate_proj.weight.shape[0]
    with torch.no_grad():
        layer.self_attn.k_proj.weight.fill_(7.0)
        layer.mlp.up_proj.weight.fill_(3.0)
        model.lm_head.weight[0].fill_(5.0)
    qkv = served["model.layers.1.self_attn.qkv_proj.weight"]
    assert (qkv[q_rows:2 * q_rows] == 7.0).all() and not (qkv[:q_rows] == 7.0).any()
    assert (served["model.layers.1.mlp.gate_up_proj.weight"][gate_rows:] == 3.0).all()
    assert (served["model.embed_tokens.weight" if tied else "lm_head.weight"][0] == 5.0).all()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_final_model_of_views_of_vllm_tensors_is_an_ordinary_checkpoint(tiny_model_path, tmp_path):
    """No vLLM: the parameters of mode=shared's trainer are views of vLLM-layout tensors (fused
    q/k/v and gate/up, padded vocabulary); final/ holds each view's values under HF names, and
    `from_pretrained` of it gives the trainer's probe logprobs."""
    config = AutoConfig.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    served = vllm_layout(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    model = meta_model(config, "float32", torch.device("cpu"))
    attach(model, hf_views(served, {n: p.shape for n, p in model.named_parameters()}, name_map(config)))
    policy = Policy(tiny_model_path, model=model)
    ids = probe_ids(policy)
    trainer = policy.probe_logprobs(ids)
    out = final.save(policy, tmp_path)
    assert max_diff(hf_probe(out, ids), trainer) <= HF_TOL
    assert max_diff(hf_probe(tiny_model_path, ids), trainer) > 1e-2  # not the base model's weights


class NeverStarted:
    """A server that must not be started: the check has to come first."""

    def alive(self) -> bool:
        return False

    def start(self):
        raise AssertionError("vLLM was started before the setup was checked")


def test_unsupported_setups_fail_at_start(tiny_model_path, tmp_path):
    from lab.compose import Refused, check

    with pytest.raises(Refused, match="hardware.vllm_tp=1"):
        check(make_cfg("mode=shared", "hardware.vllm_tp=2"))
    with pytest.raises(Refused, match="vLLM must run on the trainer's device"):
        check(make_cfg("mode=shared", "hardware=gpu_split"))
    config = AutoConfig.from_pretrained(tiny_model_path)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)
    with pytest.raises(NameMapError, match="GPT2LMHeadModel"):
        SharedBridge().build_model(str(tmp_path), "float32", "cpu", server=NeverStarted())
    worker = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "device": "cuda:0", "device_uuid": "GPU-x"}
    with pytest.raises(SharedWeightsError, match="same device"):
        check_worker(worker, 1, torch.device("cpu"))
    with pytest.raises(SharedWeightsError, match="one vLLM worker"):
        check_worker({**worker, "device": "cpu", "tensor_parallel_size": 2}, 2, torch.device("cpu"))
    served = vllm_layout(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32))
    served["model.layers.0.mlp.gate_up_proj.weight"] = served["model.layers.0.mlp.gate_up_proj.weight"][:-1]
    model = meta_model(config, "float32", torch.device("cpu"))
    with pytest.raises(NameMapError, match="gate_up_proj"):
        hf_views(served, {n: p.shape for n, p in model.named_parameters()}, FUSED)


def generated_tokens_per_s(server, prompts: int = 32, n: int = 8, max_tokens: int = 64) -> float:
    client = VLLMClient(server, "policy", max_tokens=max_tokens)
    ids = [[1, 2, 3, 4, 5 + i] for i in range(prompts)]
    client.generate(ids, n=2, seed=0)  # warm-up
    t = time.perf_counter()
    groups = client.generate(ids, n=n, seed=1)
    return sum(len(c.token_ids) for g in groups for c in g) / (time.perf_counter() - t)


@pytest.fixture(scope="module")
def big_server(tmp_path_factory):
    """Its own vLLM server (mode=shared args) on the BIG tiny model; tokens/s measured while vLLM
    still computes from its packed GEMM weights, before the first export switches to F.linear."""
    cfg = make_cfg("mode=shared", FP32, *BIG)
    path = model_path(cfg)
    server = build_server(cfg, tmp_path_factory.mktemp("vllm-shared"), bridge=SharedBridge(), model=path).start()
    try:
        server.packed_tokens_per_s = generated_tokens_per_s(server)
        yield server, path
    finally:
        server.stop()


@pytest.mark.slow
def test_trainer_parameters_are_vllm_memory(big_server, tmp_path):
    server, path = big_server
    before = memory_kb()
    bridge = SharedBridge(probe_tolerance=TOL)
    policy = Policy(path, model=bridge.build_model(path, "float32", "cpu", server))
    bridge.setup(policy, server, VLLMClient(server, "policy"), tmp_path)
    policy.probe_logprobs(bridge.probe_ids)  # reads every weight page
    after = memory_kb()
    model_kb = sum(p.numel() * p.element_size() for p in policy.model.parameters()) // 1024
    grown = {k: after[k] - before[k] for k in before}
    print(json.dumps({"model_kb": model_kb, "before_kb": before, "after_kb": after}))
    assert model_kb > 40_000
    assert grown["RssAnon"] < 0.2 * model_kb, f"a private copy appeared: {grown}"
    assert grown["RssShmem"] > 0.9 * model_kb, f"the weights read are not the shared pages: {grown}"

    # Same memory: each parameter lies in the shared-memory file vLLM exported, mapped by vLLM too.
    worker = bridge.worker
    served_names = {name: segment_name(h) for name, h in worker["params"].items()}
    mine = {mapped_file("self", p.data_ptr()) for p in policy.model.parameters()}
    assert mine == {f"/dev/shm{s}" for s in served_names.values()}
    vllm_maps = open(f"/proc/{worker['pid']}/maps").read()
    assert all(f"/dev/shm{s}" in vllm_maps for s in served_names.values())
    assert bridge.probe_diff() <= TOL

    # The measurement sees a copy when there is one.
    base = memory_kb()["RssAnon"]
    copy = [p.detach().clone() for p in policy.model.parameters()]
    assert memory_kb()["RssAnon"] - base > 0.9 * model_kb
    del copy


@pytest.mark.slow
def test_optimizer_step_is_the_sync(big_server, tmp_path, monkeypatch):
    server, path = big_server
    bridge = SharedBridge(probe_tolerance=TOL)
    policy = Policy(path, model=bridge.build_model(path, "float32", "cpu", server))
    bridge.setup(policy, server, VLLMClient(server, "policy"), tmp_path)
    bridge.ensure_synced()
    served_before = bridge.client.prompt_logprobs(bridge.probe_ids)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    ids = torch.tensor([bridge.probe_ids])
    (-token_logprobs(policy.model, ids, torch.ones_like(ids), 1).sum()).backward()

    calls = []
    post = server.post
    monkeypatch.setattr(server, "post", lambda p, *a, **k: calls.append(p.split("?")[0]) or post(p, *a, **k))
    with bridge.step_context():
        optimizer.step()
    stats = bridge.sync(step=1)
    monkeypatch.undo()

    served_after = bridge.client.prompt_logprobs(bridge.probe_ids)
    moved = max(abs(a - b) for a, b in zip(served_before, served_after))
    print(json.dumps({"probe_max_diff": stats.probe_max_diff, "pause_ms": stats.pause_ms, "served_moved": moved}))
    assert moved > 1e-2, "the step must change what vLLM serves, or the test proves nothing"
    assert stats.probe_max_diff <= TOL and stats.bytes == 0
    assert 0 < stats.pause_ms < 5000 and stats.pause_ms == bridge.pause_ms  # its own field; ms: the push's
    assert calls[:3] == ["/pause", "/reset_prefix_cache", "/resume"]
    assert set(calls[3:]) == {"/v1/completions"}, f"a weight transfer call was made: {calls}"


@pytest.mark.slow
@pytest.mark.heavy
def test_plain_linear_throughput(big_server):
    """vLLM computes from the shared tensors with F.linear instead of its packed kernels: the cost."""
    server, _ = big_server
    server.post("/collective_rpc", {"method": "use_plain_linear"})
    plain = generated_tokens_per_s(server)
    print(json.dumps({"packed_tokens_per_s": server.packed_tokens_per_s, "plain_tokens_per_s": plain}))
    assert plain > 0.3 * server.packed_tokens_per_s


@pytest.mark.slow
def test_shared_run_learns(tmp_path, spy_final):
    history = train(make_cfg("mode=shared", FP32, *SHORT_RUN), tmp_path)
    assert_learns(history)
    # final/ was written while the weights were still vLLM's memory, and holds what the trainer had.
    assert max_diff(hf_probe(tmp_path / "final", spy_final["ids"]), spy_final["trainer"]) <= HF_TOL
    syncs = read_jsonl(tmp_path / "sync.jsonl")
    assert len(syncs) == 30 and all(s["bytes"] == 0 and s["probe_max_diff"] <= TOL and s["pause_ms"] > 0
                                    and (s["finetune"], s["sync"]) == ("full", "shared") for s in syncs)
    assert all(m["sync_bytes"] == 0 and m["sync_ms"] > 0 for m in history)
    assert max(m["logprob_gap"] for m in history) < run_precision(tmp_path).gap_tolerance


# -- shared-memory files never outlive the run ----------------------------------------------------

EXPORTER = """
import multiprocessing, signal, sys, time, torch
from bridges.shared_memory import export_tensor, register_segments

TENSORS = []  # held for the process's life, as vLLM's worker holds its model


def worker(out):  # as vLLM runs its workers: a multiprocessing child; SIGTERM raises SystemExit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    TENSORS.extend(torch.zeros(1000) for _ in range(3))
    out.send((multiprocessing.current_process().pid, str(register_segments(map(export_tensor, TENSORS)))))
    time.sleep(600)

if __name__ == "__main__":
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=worker, args=(theirs,))
    child.start()
    print(*ours.recv(), flush=True)
    child.join()
"""


def exporter():
    """A worker process that put three tensors in shared memory: its pid, manifest and files."""
    proc = subprocess.Popen([sys.executable, "-c", EXPORTER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    pid, manifest = proc.stdout.readline().split()
    names = json.loads(Path(manifest).read_text())
    files = [SHM / n.lstrip("/") for n in names]
    assert len(files) == 3 and all(f.exists() for f in files)
    return proc, int(pid), Path(manifest), files


def children_named(pid: int, name: str) -> list[int]:
    """Children of `pid` whose command name is `name` (the kernel keeps its first 15 characters)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        if comm == name and int(rest.split()[1]) == pid:
            found.append(int(entry))
    return found


def test_worker_stopped_by_sigterm_removes_its_files():
    proc, pid, manifest, files = exporter()
    os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not manifest.exists() and not any(f.exists() for f in files)


def test_files_of_a_killed_worker_go_at_the_next_start_and_a_live_ones_stay():
    killed, killed_pid, killed_manifest, killed_files = exporter()
    live, live_pid, live_manifest, live_files = exporter()
    try:
        # Killed with its torch_shm_manager (a killed process group, the OOM killer): nothing of
        # torch's is left to remove the files, which hold RAM until someone does.
        for pid in [*children_named(killed_pid, "torch_shm_manag"), killed_pid]:
            os.kill(pid, signal.SIGKILL)
        killed.wait(timeout=60)
        assert all(f.exists() for f in killed_files)
        assert remove_stale() >= 3
        assert not killed_manifest.exists() and not any(f.exists() for f in killed_files)
        assert live_manifest.exists() and all(f.exists() for f in live_files)
    finally:
        os.kill(live_pid, signal.SIGTERM)
        live.wait(timeout=60)
    assert not any(f.exists() for f in live_files)


def run_files(pids) -> list[str]:
    """/dev/shm entries made by these processes: torch's files and our manifests name the pid."""
    return [f for f in os.listdir(SHM) if any(f.startswith((f"torch_{p}_", f"grpo-segments-{p}-")) for p in pids)]


@pytest.mark.slow
@pytest.mark.heavy  # a clean and a killed run, each with its own server
def test_shared_memory_files_go_when_the_run_ends_however_it_ends(tmp_path, monkeypatch):
    # A trainer killed with SIGKILL: its server goes (serving/lifeline.py), vLLM's shutdown
    # SIGKILLs its worker, and the worker's files stay until the next start.
    code, pids, _, gone_s = start_trainer_and_kill(tmp_path / "killed", signal.SIGKILL, "mode=shared")
    left = run_files(pids)

    # The next start removes them; the files of its own server go when it ends.
    bridges = []
    setup = SharedBridge.setup
    monkeypatch.setattr(SharedBridge, "setup", lambda self, *a: bridges.append(self) or setup(self, *a))
    train(make_cfg("mode=shared", FP32, *QUIET, "train.steps=2"), tmp_path / "clean")
    worker = bridges[0].worker
    names = [segment_name(h) for h in worker["params"].values()]
    print(json.dumps({"killed_server_pids": pids, "gone_s": round(gone_s, 1), "left_by_killed_run": len(left),
                      "clean_run_files": len(names)}))
    assert len(names) >= 10
    assert not [f for f in left if (SHM / f).exists()]
    assert not [n for n in names if (SHM / n.lstrip("/")).exists()]
    assert run_files([*pids, worker["pid"]]) == []
