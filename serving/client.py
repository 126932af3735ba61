"""Rollout client: token ids in, token ids and sampled logprobs out, from vLLM's OpenAI server.

The trainer trains on exactly the ids vLLM sampled (`return_token_ids`), never on re-tokenized
text, and compares its logprobs with vLLM's sampled ones (`logprobs: 0`, server started with
`--logprobs-mode processed_logprobs` so they include temperature, as the trainer's do).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from grpo.data import Completion
from grpo.seeds import prompt_seeds
from serving.server import Deadline, VLLMServer


class VLLMClient:
    """Batched /v1/completions calls: one HTTP request carries every prompt of a step."""

    def __init__(
        self,
        server: VLLMServer,
        model: str,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        timeout_s: float = 600.0,
        ignore_eos: bool = False,
    ):
        self.server = server
        self.model = model  # what requests name: the served base, or the adapter (Bridge.served_model)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.deadline = Deadline(timeout_s, "rollout.timeout_s")  # each generate request's (eval: eval_s)
        self.ignore_eos = ignore_eos  # every completion runs to max_tokens (benchmarks: equal token counts)

    def generate(self, prompt_ids: list[list[int]], n: int, seed: Optional[int] = None) -> list[list[Completion]]:
        """With `seed`, each prompt's request gets its own (grpo/seeds.py prompt_seeds). A request
        has one seed for all its prompts, and equal seeds make different prompts draw near-identical
        completions, so seeded prompts go as concurrent requests (vLLM batches them)."""
        if seed is not None and len(prompt_ids) > 1:
            with ThreadPoolExecutor(len(prompt_ids)) as pool:
                parts = pool.map(lambda ps: self.generate([ps[0]], n, ps[1]),
                                 zip(prompt_ids, prompt_seeds(seed, len(prompt_ids), n)))
                return [group for part in parts for group in part]
        payload = {
            "model": self.model,
            "prompt": prompt_ids,
            "n": n,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "logprobs": 0,
            "return_token_ids": True,
            "ignore_eos": self.ignore_eos,
        }
        if seed is not None:
            payload["seed"] = seed
        choices = self.server.post("/v1/completions", payload, self.deadline)["choices"]
        groups: list[list[Completion]] = [[] for _ in prompt_ids]
        for ch in sorted(choices, key=lambda c: c["index"]):
            groups[ch["index"] // n].append(
                Completion(
                    token_ids=list(ch["token_ids"]),
                    logprobs=[float(x) for x in ch["logprobs"]["token_logprobs"]],
                    text=ch["text"],
                    finish_reason=ch["finish_reason"],
                )
            )
        return groups

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """vLLM's logprob of each token after the first (the sync check's probe: `probe_s`)."""
        payload = {
            "model": self.model,
            "prompt": token_ids,
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": 0,
            "return_token_ids": True,
        }
        deadline = self.server.deadline("probe_s")
        entries = self.server.post("/v1/completions", payload, deadline)["choices"][0]["prompt_logprobs"]
        return [entry[str(tok)]["logprob"] for tok, entry in zip(token_ids[1:], entries[1:])]
