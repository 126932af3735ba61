"""mode=broadcast over NCCL (bridges/broadcast_nccl.py) against the installed vLLM, on CPU.

NCCL itself needs GPUs; everything around it does not. vLLM's own trainer engine is driven
through our init info and our HTTP client into vLLM's real routes; only the two NCCL calls (open
rank 0, broadcast the packed buffers) are replaced. What reaches the engine is then parsed by
vLLM's worker-side engine, as a worker would. A renamed class, field, route or body key fails
here instead of on a user's cluster.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from vllm.distributed.weight_transfer import nccl_engine
from vllm.distributed.weight_transfer.base import VLLMWeightSyncClient
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine,
                                                          NCCLWeightTransferEngine)
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from bridges.weights import Weights
from grpo.policy import Policy
from grpo.precision import Precision
from bridges.broadcast_nccl import NcclBroadcastBridge, ServerSyncClient, open_engine, trainer_init_info
from vllm_routes import running_routes

BUCKET = 64 * 2**20


@pytest.fixture
def routes():
    with running_routes(world_size=3) as served:
        yield served


class FakeCommunicator:
    destroyed = False

    def destroy(self):
        self.destroyed = True


@pytest.fixture
def no_nccl(monkeypatch):
    """Replace vLLM's two NCCL calls; record what the trainer engine hands them."""
    seen = {"opened": [], "sent": []}

    def open_endpoint(info):
        seen["opened"].append(info)
        seen["communicator"] = FakeCommunicator()
        return seen["communicator"]

    def producer(iterator, group, src, post_iter_func, buffer_size_bytes, num_buffers):
        assert group is seen["communicator"] and src == 0
        seen["sent"] += [(name, post_iter_func((name, t))) for name, t in iterator]
        seen["buffer"] = (buffer_size_bytes, num_buffers)

    monkeypatch.setattr(nccl_engine, "open_trainer_endpoint", open_endpoint)
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", producer)
    return seen


def test_our_init_info_is_vllms_trainer_init_info():
    info = trainer_init_info("10.0.0.5", 29500, 3, BUCKET)
    assert type(info) is NCCLTrainerInitInfo and info.backend == "nccl"
    assert info.is_sender and info.packed and info.packed_buffer_size_bytes == BUCKET
    fields = {f.name for f in dataclasses.fields(NCCLTrainerInitInfo)}
    assert {"master_address", "master_port", "world_size", "rank", "packed", "packed_buffer_size_bytes"} <= fields


def test_trainer_engine_signature():
    params = inspect.signature(NCCLTrainerWeightTransferEngine.trainer_init).parameters
    assert list(params)[:1] == ["init_info"]
    assert params["client"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["source"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(NCCLTrainerWeightTransferEngine.send_weights).parameters.keys() == {"self"}
    assert callable(NCCLTrainerWeightTransferEngine.shutdown)


def test_our_client_is_vllms_sync_client():
    client = ServerSyncClient(server=None, timeout_s=1)
    assert isinstance(client, VLLMWeightSyncClient)
    for name, member in inspect.getmembers(VLLMWeightSyncClient, inspect.isfunction):
        if not name.startswith("_"):
            assert list(inspect.signature(getattr(client, name)).parameters) == \
                list(inspect.signature(member).parameters)[1:], name


def test_the_server_flag_selects_vllms_nccl_engine():
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", *NcclBroadcastBridge().server_args()])
    config = EngineArgs.from_cli_args(args).weight_transfer_config
    assert config.backend == "nccl"
    assert WeightTransferEngineFactory._registry[config.backend]() is NCCLWeightTransferEngine


def test_a_sync_round_trip_reaches_the_workers_as_vllm_parses_it(routes, no_nccl, tiny_model_path):
    server, recorded = routes
    bf16 = Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16)  # the served dtype: nothing to cast
    policy = Policy(tiny_model_path, bf16)
    model = policy.model
    info = trainer_init_info("127.0.0.1", 29511, 3, BUCKET)

    engine = open_engine(info, server, Weights(policy), timeout_s=30)
    assert type(engine) is NCCLTrainerWeightTransferEngine and no_nccl["opened"] == [info]
    engine.send_weights()
    ServerSyncClient(server, 30).shutdown_weight_transfer_engine()
    engine.shutdown()

    assert [name for name, _ in recorded.calls] == ["init_weight_transfer_engine", "start_weight_update",
                                                    "update_weights", "finish_weight_update",
                                                    "shutdown_weight_transfer_engine"]
    worker = object.__new__(NCCLWeightTransferEngine)  # only its parsers: no GPU, no process group
    init = worker.parse_init_info(recorded.calls[0][1].init_info)
    assert (init.master_address, init.master_port, init.rank_offset, init.world_size) == ("127.0.0.1", 29511, 1, 3)
    assert (init.packed, init.packed_buffer_size_bytes) == (True, BUCKET)
    update = worker.parse_update_info(recorded.calls[2][1].update_info)
    params = dict(model.named_parameters())
    assert update.names == list(params)
    assert [getattr(torch, d) for d in update.dtype_names] == [torch.bfloat16] * len(params)
    assert update.shapes == [list(p.shape) for p in params.values()]
    assert [name for name, _ in no_nccl["sent"]] == update.names
    assert all(t.data_ptr() == params[name].data_ptr() for name, t in no_nccl["sent"])  # the live weights, no copies
    assert no_nccl["buffer"][0] == BUCKET
    assert recorded.calls[3][1] is None and no_nccl["communicator"].destroyed
