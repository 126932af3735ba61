"""The trainer as an Atropos trainer, with real processes: atroposlib's `run-api`, our Digits
`BaseEnv` (envs/atropos_digits.py) generating from our vLLM server's `/generate`, and train() pulling
batches from the API. It learns Digits (reward >= 0.8) in mode=reload and mode=lora; killing the env
process mid-run makes the trainer wait, say so, and go on once a new env process registers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests

pytest.importorskip("atroposlib")  # the `atropos` extra

from conftest import REPO, make_cfg  # noqa: E402
from envs.atropos import AtroposError, convert  # noqa: E402
from envs.serve import free_port  # noqa: E402
from lab.loop import train  # noqa: E402
from runtime.records import read_jsonl  # noqa: E402

QUIET = ("log.wandb.mode=disabled", "log.progress=false", "model.dtype=float32", "hardware.autocast=null",
         "eval.enabled=false")


@contextmanager
def run_api() -> Iterator[str]:
    """atroposlib's own `run-api` console script, as a process."""
    port = free_port()
    exe = shutil.which("run-api", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if requests.get(f"{url}/status", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait()


def digits_env(api: str, server, model: str, group_size: int = 8, max_tokens: int = 16) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "envs.atropos_digits", "--api", api, "--vllm",
                             f"{server.base_url}/v1", "--model", "policy", "--tokenizer", model,
                             "--group-size", str(group_size), "--max-tokens", str(max_tokens)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Tok:
    eos_token_id = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def group(n: int, prompt=(5, 6), completion=(7, 0), **extra) -> dict:
    return {"tokens": [[*prompt, *completion]] * n, "masks": [[-100] * len(prompt) + list(completion)] * n,
            "scores": [float(i) for i in range(n)], **extra}


def test_a_batch_becomes_a_rollout_with_overrides_and_logprobs():
    g = group(2, inference_logprobs=[[1.0, 1.0, -0.5, -0.25]] * 2,
              overrides=[{}, {"set_advantage_to_zero": True}], env_id=3)
    rollout, own = convert([g], group_size=2, prompts=1, max_tokens=4, max_token_len=8, tokenizer=Tok())
    assert not own and rollout.prompt_ids == [[5, 6]]
    c = rollout.groups[0][1]
    assert (c.token_ids, c.logprobs, c.finish_reason) == ([7, 0], [-0.5, -0.25], "stop")
    assert rollout.rewards.tolist() == [[0.0, 1.0]] and rollout.zero_advantage.tolist() == [[False, True]]
    assert rollout.prompts[0].meta == {"env": "atropos_3"}
    assert convert([group(2)], 2, 1, 4, 8, Tok())[1]  # no inference_logprobs: the trainer's own


@pytest.mark.parametrize("batch, key", [
    ([group(3)], r"train.group_size=2: an Atropos group \(env_id None\) has 3 sequences"),
    ([group(2, completion=(7, 8, 9, 10, 11))], r"rollout.max_tokens=4: an Atropos completion has 5 tokens"),
    ([group(2, prompt=tuple(range(1, 9)))], r"env.max_token_len=8: an Atropos sequence has 10 tokens"),
    ([group(2), group(2)], r"train.prompts_per_step=1: the Atropos batch holds 2 groups"),
])
def test_a_batch_that_differs_from_the_config_names_key_and_value(batch, key):
    with pytest.raises(AtroposError, match=key):
        convert(batch, group_size=2, prompts=1, max_tokens=4, max_token_len=8, tokenizer=Tok())


def test_unreachable_api_fails_at_start_naming_the_key(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Exception, match=rf"env.api_url={url}: no Atropos run-api answers POST /register"):
        train(make_cfg("env=atropos", f"env.api_url={url}", "env.timeout_s=2", *QUIET), tmp_path)


@pytest.mark.slow
def test_generate_route_answers_atropos_vllm_client(attach, vllm_server, tiny_model_path):
    """Atropos' own vLLM client (server_type: vllm) against our server's /generate."""
    import asyncio

    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer as AtroposVLLM

    client = AtroposVLLM(APIServerConfig(base_url=f"{vllm_server.base_url}/v1", model_name="policy",
                                         server_type="vllm", tokenizer_name=tiny_model_path, timeout=60,
                                         api_key="none"))
    prompt, outs, lps, finishes = asyncio.run(client._tokens_and_logprobs_completion_wrapper(
        input_ids=[1, 2, 3], model="policy", n=3, max_tokens=5, temperature=1.0, seed=7))
    assert prompt == [1, 2, 3] and len(outs) == len(lps) == len(finishes) == 3
    # the same request through /v1/completions: the same ids and logprobs
    ref = vllm_server.post("/v1/completions", {"model": "policy", "prompt": [1, 2, 3], "n": 3, "max_tokens": 5,
                                               "temperature": 1.0, "seed": 7, "logprobs": 0, "return_token_ids": True})
    choices = sorted(ref["choices"], key=lambda c: c["index"])
    assert outs == [c["token_ids"] for c in choices]
    assert sum(lps, []) == pytest.approx(sum((c["logprobs"]["token_logprobs"] for c in choices), []))
    bad = requests.post(f"{vllm_server.base_url}/generate", json={"prompt": "text"}, timeout=10)
    assert bad.status_code == 400 and "prompt_token_ids" in bad.text


@pytest.mark.slow
def test_generate_samples_from_the_model_the_trainer_names(attach, vllm_server, tiny_model_path, tmp_path):
    """With sync=adapter the trainer's rollouts name the adapter; so does /generate then."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    vllm_server.post("/v1/load_lora_adapter", {"lora_name": "atropos-test", "lora_path": str(tmp_path / "adapter")})
    request = {"prompt": {"prompt_token_ids": [1, 2, 3]}, "logprobs": 0, "n": 2, "max_tokens": 4, "seed": 3}

    def generate() -> dict:
        return requests.post(f"{vllm_server.base_url}/generate", json=request, timeout=30).json()

    def completions(model: str) -> list[list[int]]:
        out = vllm_server.post("/v1/completions", {"model": model, "prompt": [1, 2, 3], "n": 2, "max_tokens": 4,
                                                   "seed": 3, "logprobs": 0, "return_token_ids": True})
        return [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    try:
        base = generate()
        assert base["token_ids"] == completions("policy")
        vllm_server.post("/atropos/generate_model", {"model": "atropos-test"})
        adapted = generate()
        assert adapted["token_ids"] == completions("atropos-test") != base["token_ids"]
    finally:
        vllm_server.post("/atropos/generate_model", {"model": None})
        vllm_server.post("/v1/unload_lora_adapter", {"lora_name": "atropos-test"})
    assert generate()["token_ids"] == base["token_ids"]


@pytest.mark.slow
def test_a_batch_of_another_group_size_stops_the_run_at_that_batch(attach, tmp_path):
    """Groups of 2 pushed to a real run-api for a trainer of group size 4: the first batch stops the
    run naming train.group_size; what the run wrote before stays."""
    with run_api() as api:
        def push():
            while requests.get(f"{api}/info", timeout=5).json()["batch_size"] == -1:  # the trainer registers
                time.sleep(0.1)
            for _ in range(4):
                requests.post(f"{api}/scored_data", json=group(2), timeout=5).raise_for_status()

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        with pytest.raises(AtroposError, match=r"train.group_size=4: an Atropos group \(env_id None\) has 2"):
            train(make_cfg("mode=reload", attach, "env=atropos", f"env.api_url={api}", "train.prompts_per_step=2",
                           "train.group_size=4", "train.steps=2", *QUIET), tmp_path)
        pusher.join(timeout=30)
    assert any(e["event"] == "precision" for e in read_jsonl(tmp_path / "events.jsonl"))


def learned(history: list[dict], level: float = 0.8) -> float:
    last = sum(m["reward_mean"] for m in history[-5:]) / 5
    assert last >= level, [round(m["reward_mean"], 3) for m in history]
    return last


@pytest.mark.slow
def test_reload_learns_digits_through_atropos_and_waits_for_a_new_env(attach, vllm_server, tiny_model_path,
                                                                       tmp_path, capfd):
    with run_api() as api:
        procs = [digits_env(api, vllm_server, tiny_model_path)]
        killed = threading.Event()

        def kill_then_replace():
            """At step 8 the env process dies; 6 s later a new one registers."""
            metrics = tmp_path / "metrics.jsonl"
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 8):
                time.sleep(0.2)
            procs[0].kill()
            killed.set()
            time.sleep(6)
            procs.append(digits_env(api, vllm_server, tiny_model_path))

        watcher = threading.Thread(target=kill_then_replace, daemon=True)
        watcher.start()
        try:
            history = train(make_cfg("mode=reload", attach, "env=atropos", f"env.api_url={api}",
                                     "env.wait_message_s=3", "train.steps=40", *QUIET), tmp_path)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    assert killed.is_set() and len(procs) == 2
    assert "env=atropos: no batch from" in capfd.readouterr().err
    learned(history)
    assert all(m["atropos_own_logprobs"] == 0 and m["time_convert"] < 1.0 for m in history)
    gaps = [m["time_pull"] for m in history[8:]]
    assert max(gaps) > 3  # the step that waited for the new env


@pytest.mark.slow
@pytest.mark.parametrize("sync", [("mode=lora",), pytest.param(("mode=lora", "sync=adapter"),
                                                                marks=pytest.mark.heavy)], ids=["merged", "adapter"])
def test_lora_learns_digits_through_atropos(attach, vllm_server, tiny_model_path, tmp_path, sync):
    """mode=lora: the adapter merged into vLLM's weights; sync=adapter (heavy; CI's cheaper counterpart
    is test_generate_samples_from_the_model_the_trainer_names): the envs' /generate names the adapter."""
    with run_api() as api:
        proc = digits_env(api, vllm_server, tiny_model_path)
        try:
            history = train(make_cfg(*sync, attach, "env=atropos",
                                     f"env.api_url={api}", "train.steps=40", *QUIET), tmp_path)
        finally:
            proc.kill()
            proc.wait()
    learned(history)
    events = [json.loads(line) for line in (tmp_path / "sync.jsonl").read_text().splitlines()]
    assert len(events) == 40
