"""The vLLM server manager and rollout client against a real vLLM process."""

from __future__ import annotations

import pytest

from serving.server import VLLMServer, VLLMStartError
from grpo.policy import Policy
from serving.client import VLLMClient

pytestmark = pytest.mark.slow


def test_generate_returns_token_ids_and_sampled_logprobs(vllm_server, tiny_model_path):
    policy = Policy(tiny_model_path)
    client = VLLMClient(vllm_server, "policy", max_tokens=8)
    prompts = [policy.encode_chat([{"role": "user", "content": f"Count on from {k}:"}]) for k in (3, 40)]
    groups = client.generate(prompts, n=4)
    assert [len(g) for g in groups] == [4, 4]
    for group in groups:
        for c in group:
            assert 1 <= len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
    # The ids are the ones sampled: the trainer scores them to within fp32 noise.
    c = groups[0][0]
    mine = policy.probe_logprobs(prompts[0] + c.token_ids)[len(prompts[0]) - 1 :]
    assert max(abs(a - b) for a, b in zip(mine, c.logprobs)) < 1e-3


def test_seeded_rollouts_beyond_one_step_budget_repeat_and_keep_the_server_up(vllm_server, tiny_model_path):
    """64 seeded prompts of ~60 tokens overflow vLLM's 2048-token step budget; with chunked
    prefill vLLM's CPU runner died here ("CPU Generator does not use offset")."""
    policy = Policy(tiny_model_path)
    client = VLLMClient(vllm_server, "policy", max_tokens=4)
    prompts = [policy.encode_chat([{"role": "user", "content": f"Count on from {k} " * 8}]) for k in range(64)]
    assert sum(map(len, prompts)) > 2048
    first = client.generate(prompts, n=2, seed=7)
    again = client.generate(prompts, n=2, seed=7)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]
    assert vllm_server.healthy()


def test_dev_endpoints_bind_to_loopback(vllm_server):
    assert vllm_server.base_url.startswith("http://127.0.0.1:")
    assert "--host" in vllm_server.command() and "127.0.0.1" in vllm_server.command()


def test_failed_start_reports_log_tail(tmp_path, tiny_model_path):
    server = VLLMServer(tiny_model_path, args=["--no-such-flag"], env={}, log_path=tmp_path / "vllm.log",
                        startup_timeout_s=300)
    with pytest.raises(VLLMStartError) as err:
        server.start()
    assert "exited with code" in str(err.value)
    assert "--no-such-flag" in str(err.value)  # the tail of vLLM's own log names the cause
