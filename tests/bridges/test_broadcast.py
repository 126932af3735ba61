"""sync=broadcast: weights pushed over a gloo group into the real vLLM server's workers.

Tolerance: after a sync, max |logprob_vllm - logprob_trainer| over the probe <= 1e-3 (fp32).
Failure handling is tested against a loopback stand-in server that answers vLLM's endpoints but
never joins the group, or joins and then drops the connection mid-sync, or never answers the
sync's call (a hung vLLM: the guard's VLLMHungError, within the sync's deadline). The NCCL bridge cannot run
without GPUs: its calls into vLLM are checked in tests/contracts/."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from bridges.base import WeightSyncError
from bridges.broadcast_gloo import GlooBroadcastBridge
from bridges.broadcast_nccl import NcclBroadcastBridge, shared_gpus
from runtime import distributed
from runtime.config import DeadlinesConfig
from serving.server import VLLMHungError, VLLMRequestError, VLLMServer
from grpo.policy import Policy
from serving.client import VLLMClient
from conftest import PROBE_TOL as TOL
from conftest import loopback_http, make_cfg, perturb, restore_pristine


def test_buckets_group_by_dtype_and_size():
    named = {"a": torch.zeros(100), "b": torch.zeros(100), "c": torch.zeros(300),
             "h": torch.zeros(10, dtype=torch.bfloat16)}
    plan = distributed.buckets(named, bucket_bytes=1000)
    assert [list(b) for b in plan] == [["a", "b"], ["c"], ["h"]]
    assert [list(b) for b in distributed.buckets(named, 0)] == [["a"], ["b"], ["c"], ["h"]]


@pytest.mark.parametrize("hardware, bridge", [("cpu", GlooBroadcastBridge), ("gpu", GlooBroadcastBridge),
                                              ("gpu_split", NcclBroadcastBridge)])
def test_the_hardware_picks_the_mechanism(hardware, bridge):
    """One GPU (or none): gloo through host memory; separate GPUs: vLLM's NCCL engine, whose
    server needs the weight-transfer flag."""
    built = instantiate(make_cfg("mode=broadcast", f"hardware={hardware}").sync.bridge)
    assert type(built) is bridge
    if bridge is NcclBroadcastBridge:
        assert "--weight-transfer-config" in built.server_args()


def test_the_nccl_engine_reads_what_vllm_should_serve(tiny_model_path):
    """No GPU needed: vLLM's engine iterates our source (HF names, served dtype, LoRA merged), and
    its metadata agrees with the iteration element for element, as the engine requires."""
    from bridges.broadcast_nccl import weight_source
    from bridges.weights import Weights
    from runtime.config import LoraConfig

    policy = Policy(tiny_model_path, lora=LoraConfig())
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    weights = Weights(policy)
    source = weight_source(weights, bucket_bytes=1 << 20)
    meta = source.metadata()
    sent = dict(source)
    assert [m.name for m in meta] == list(sent) and all(m.shape == tuple(sent[m.name].shape) for m in meta)
    assert not any(".lora_" in n or "base_layer" in n for n in sent)  # plain HF names: the merge
    expected = weights.merged.state_dict()
    assert all(torch.equal(sent[n], expected[n]) for n in sent)
    assert sum(len(names) for names, _ in source.iter_groups()) == len(meta)


def test_a_trainer_gpu_among_vllm_gpus_is_found_by_uuid():
    workers = [{"device": "cuda:0", "device_uuid": "GPU-a"}, {"device": "cuda:1", "device_uuid": "GPU-b"}]
    assert shared_gpus("GPU-b", workers) == [workers[1]]
    assert shared_gpus("GPU-c", workers) == []


@pytest.mark.slow
def test_broadcast_sync_serves_trainer_weights(vllm_server, tiny_model_path, tmp_path):
    policy = Policy(tiny_model_path)
    timings = {}
    try:
        for bucket_mb in (64, 0):  # one bucket vs one broadcast per tensor
            bridge = GlooBroadcastBridge(bucket_mb=bucket_mb, timeout_s=60, probe_tolerance=TOL)
            bridge.setup(policy, vllm_server, VLLMClient(vllm_server, "policy"), tmp_path)
            perturb(policy)
            assert bridge.probe_diff() > 1e-2
            stats = bridge.sync(step=1)
            assert stats.probe_max_diff <= TOL
            assert stats.bytes == sum(p.numel() * 4 for p in policy.model.parameters())
            timings[bucket_mb] = stats.ms
            bridge.close()
        print(f"\nbroadcast sync: bucketed {timings[64]:.1f} ms, per-tensor {timings[0]:.1f} ms")
    finally:
        restore_pristine(vllm_server, tiny_model_path)


@pytest.mark.slow
@pytest.mark.heavy
def test_a_restarted_server_joins_a_new_group(vllm_server, tiny_model_path, tmp_path):
    """vLLM restarted (what the trainer does when its server died): the old group's workers are
    gone, so the next sync forms a new group instead of broadcasting into the old one."""
    policy = Policy(tiny_model_path)
    bridge = GlooBroadcastBridge(timeout_s=30, probe_tolerance=TOL)
    try:
        bridge.setup(policy, vllm_server, VLLMClient(vllm_server, "policy"), tmp_path)
        first = bridge.joined_server
        vllm_server.restart()
        perturb(policy)
        assert bridge.probe_diff() > 1e-2
        stats = bridge.sync(step=1)
        assert bridge.joined_server != first
        assert stats.probe_max_diff <= TOL and stats.extra["attempts"] == 1
    finally:
        bridge.close()
        restore_pristine(vllm_server, tiny_model_path)


class StandIn(BaseHTTPRequestHandler):
    """Answers like a vLLM server with one worker; `join` says whether it joins the group,
    `receive` what it does with the sync's call: "drop" the connection, or "hang" (no answer)."""

    join = False
    receive = "drop"
    release = threading.Event()

    def log_message(self, *args):
        pass

    def _reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply({"world_size": 1} if self.path.startswith("/get_world_size") else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("method") == "join_weight_group" and self.join:
            kw = body["kwargs"]
            store = torch.distributed.TCPStore(kw["host"], kw["port"], 2, is_master=False)
            StandIn.group = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("grpo-weights", store), 1, 2)
            self._reply({"results": [1]})
        elif body.get("method") == "receive_weights" and self.receive == "hang":
            StandIn.release.wait()  # alive, never answering
        elif body.get("method") == "receive_weights":
            self.connection.close()  # the server dies mid-sync
        else:
            self._reply({"results": [None]})


@pytest.fixture
def stand_in():
    with loopback_http(StandIn) as url:
        yield VLLMServer("stand-in", args=[], env={}, log_path=Path("/dev/null"), base_url=url,
                         deadlines=DeadlinesConfig(sync_s=3.0))


def test_group_that_cannot_form_names_host_and_port(stand_in, tiny_model_path, tmp_path):
    StandIn.join = False
    bridge = GlooBroadcastBridge(group_port=None, timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"could not form the weight group 127\.0\.0\.1:\d+"):
        bridge.setup(Policy(tiny_model_path), stand_in, VLLMClient(stand_in, "policy"), tmp_path)
    assert time.monotonic() - t0 < 30


def test_server_gone_mid_sync_names_host_and_port(stand_in, tiny_model_path, tmp_path):
    """The sync's request error (what the guard checks for a dead server), naming the group."""
    StandIn.join, StandIn.receive = True, "drop"
    bridge = GlooBroadcastBridge(timeout_s=5)
    bridge.setup(Policy(tiny_model_path), stand_in, VLLMClient(stand_in, "policy"), tmp_path)
    t0 = time.monotonic()
    with pytest.raises(VLLMRequestError, match=r"weight group 127\.0\.0\.1:\d+ \(vLLM at http://127\.0\.0\.1:\d+\)"):
        bridge.push(step=1)
    assert time.monotonic() - t0 < 60


def test_server_hung_mid_sync_ends_at_the_sync_deadline(stand_in, tiny_model_path, tmp_path):
    """vLLM joined, then stops answering (SIGSTOP, a wedged engine): the push ends with the
    guard's VLLMHungError after the receive call's deadline (sync_s + sync_s_per_gb * GB; the
    broadcast's own gloo timeout, timeout_s=5, is longer here)."""
    StandIn.join, StandIn.receive = True, "hang"
    bridge = GlooBroadcastBridge(timeout_s=5)
    bridge.setup(Policy(tiny_model_path), stand_in, VLLMClient(stand_in, "policy"), tmp_path)
    t0 = time.monotonic()
    with pytest.raises(VLLMHungError) as err:
        bridge.push(step=1)
    assert time.monotonic() - t0 < 5 + 3 + 10
    assert err.value.call == "POST /collective_rpc" and err.value.key.startswith("server.deadlines.sync_s")
