"""`<run dir>/final/`: the model a run leaves behind loads in `AutoModelForCausalLM.from_pretrained`
and in a vLLM server, and gives the trainer's logprobs on a probe (fp32: <= 1e-4 in HF, the
same kernels; <= 1e-3 in vLLM, the bridges' probe tolerance). With LoRA: the adapter in final/
and the merged model in final/merged/. Saved atomically: a failed save keeps the previous one.
mode=shared (parameters that are views of vLLM's tensors): tests/bridges/test_shared.py."""

from __future__ import annotations

import pytest
import torch

from conftest import PROBE_TOL, make_cfg, perturb, restore_pristine
from lab import final
from runtime.config import LoraConfig
from grpo.policy import Policy
from serving.client import VLLMClient
from lab.loop import train
from support import HF_TOL, hf_probe, max_diff, probe_ids, spy_final  # noqa: F401 (spy_final: a fixture)

def bump_lora(policy: Policy) -> None:
    """The adapter away from its identity init, as training moves it (B = 0 at start)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_full_model_final_loads_with_from_pretrained(tiny_model_path, tmp_path):
    policy = Policy(tiny_model_path)
    ids = probe_ids(policy)
    base = policy.probe_logprobs(ids)
    perturb(policy)
    trained = policy.probe_logprobs(ids)
    out = final.save(policy, tmp_path, merge_lora=True)  # no adapter: nothing to merge
    assert out == tmp_path / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert not (out / "merged").exists() and not list(tmp_path.glob(".tmp-*"))
    assert max_diff(hf_probe(out, ids), trained) <= HF_TOL
    assert max_diff(base, trained) > 1e-2  # the saved weights are not the base model's


def test_lora_final_is_the_adapter_plus_the_merged_model(tiny_model_path, tmp_path):
    policy = Policy(tiny_model_path, lora=LoraConfig())
    bump_lora(policy)
    ids = probe_ids(policy)
    trained = policy.probe_logprobs(ids)
    out = final.save(policy, tmp_path, merge_lora=True)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "merged").iterdir()}
    assert max_diff(hf_probe(out, ids), trained) <= HF_TOL  # transformers applies the PEFT adapter itself
    assert max_diff(hf_probe(out / "merged", ids), trained) <= HF_TOL
    assert max_diff(hf_probe(tiny_model_path, ids), trained) > 1e-2

    final.save(policy, tmp_path, merge_lora=False)  # finetune.lora.merge_on_save=false
    assert (out / "adapter_model.safetensors").is_file() and not (out / "merged").exists()


def test_a_failed_save_keeps_the_previous_final(tiny_model_path, tmp_path, monkeypatch):
    policy = Policy(tiny_model_path)
    ids = probe_ids(policy)
    before = policy.probe_logprobs(ids)
    final.save(policy, tmp_path)
    perturb(policy)

    def disk_full(out):
        (out / "config.json").write_text("{")  # half written
        raise OSError("disk full")

    monkeypatch.setattr(policy, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        final.save(policy, tmp_path)
    assert max_diff(hf_probe(tmp_path / "final", ids), before) <= HF_TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reload", "lora"])
def test_a_runs_final_model_gives_the_trainers_logprobs_in_hf_and_vllm(mode, attach, vllm_server, tiny_model_path,
                                                                        tmp_path, spy_final):
    """train() writes final/ (mode=lora: merge_on_save, the default); loaded by HF and by the
    session vLLM server (`reload_weights` from the dir, and the adapter by /v1/load_lora_adapter),
    it reproduces the trainer's probe logprobs, while vLLM on the base weights does not."""
    cfg = make_cfg(f"mode={mode}", attach, "train.steps=2", "log.wandb.mode=disabled", "log.progress=false")
    train(cfg, tmp_path)
    out = tmp_path / "final"
    assert spy_final["dir"] == out
    ids, trainer = spy_final["ids"], spy_final["trainer"]
    weights = out / "merged" if mode == "lora" else out
    assert max_diff(hf_probe(weights, ids), trainer) <= HF_TOL
    client = VLLMClient(vllm_server, model=cfg.model.served_name)
    try:
        restore_pristine(vllm_server, tiny_model_path)
        vllm_server.post("/reset_prefix_cache")
        assert max_diff(client.prompt_logprobs(ids), trainer) > 10 * PROBE_TOL  # the run moved the weights
        if mode == "lora":
            assert max_diff(hf_probe(out, ids), trainer) <= HF_TOL
            vllm_server.post("/v1/load_lora_adapter", {"lora_name": "final-adapter", "lora_path": str(out)})
            try:
                adapter = VLLMClient(vllm_server, model="final-adapter").prompt_logprobs(ids)
            finally:
                vllm_server.post("/v1/unload_lora_adapter", {"lora_name": "final-adapter"})
            assert max_diff(adapter, trainer) <= PROBE_TOL
        restore_pristine(vllm_server, str(weights))  # any HF dir: here final/ (or final/merged/)
        vllm_server.post("/reset_prefix_cache")
        assert max_diff(client.prompt_logprobs(ids), trainer) <= PROBE_TOL
    finally:
        restore_pristine(vllm_server, tiny_model_path)
