"""Digits as a stock Atropos environment (an `atroposlib.envs.BaseEnv` subclass), run as its own
process: it takes prompts from our DigitsEnv, generates each group from a vLLM server through
Atropos' `server_type: vllm` client (our server answers its `/generate`: serving/atropos_generate.py),
scores with Digits' digit fraction, and pushes scored groups (tokens, masks, scores,
inference_logprobs) to an Atropos `run-api`, from which `env=atropos` trains.

    run-api --port 8000
    python -m envs.atropos_digits --api http://127.0.0.1:8000 --vllm http://127.0.0.1:<vllm port>/v1 \\
        --model <served model name> --tokenizer <model path> --group-size 4 --max-tokens 16

It stays `max_batches_offpolicy` batches ahead of the trainer at most (Atropos' own bound: the
trainer's step is the API's `/status` `current_step`). Needs the `atropos` extra.
"""

from __future__ import annotations

import argparse
import asyncio

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig

from envs.synthetic import DigitsEnv, digit_fraction
from grpo.policy import encode_chat


class DigitsAtroposEnv(BaseEnv):
    name = "digits"

    def __init__(self, config: BaseEnvConfig, server_configs, digits: DigitsEnv, max_tokens: int,
                 temperature: float = 1.0):
        super().__init__(config, server_configs)
        self.digits, self.max_tokens, self.temperature = digits, max_tokens, temperature

    async def setup(self) -> None:
        pass

    async def get_next_item(self):
        return self.digits.sample(1)[0]

    async def collect_trajectories(self, item):
        """One group: `group_size` completions of the prompt, trained on the completion only."""
        prompt = encode_chat(self.tokenizer, item.messages)
        _, outputs, logprobs, _ = await self.server.tokens_and_logprobs_completion(
            input_ids=prompt, n=self.config.group_size, max_tokens=self.max_tokens, temperature=self.temperature,
            split="train")
        group = {"tokens": [], "masks": [], "scores": [], "inference_logprobs": [], "overrides": [],
                 "advantages": None, "ref_logprobs": None, "messages": None, "group_overrides": {}, "images": None}
        for ids, lps in zip(outputs, logprobs):
            group["tokens"].append(prompt + ids)
            group["masks"].append([-100] * len(prompt) + ids)  # -100: not trained (the prompt)
            group["scores"].append(digit_fraction(self.tokenizer.decode(ids, skip_special_tokens=True)))
            group["inference_logprobs"].append([1.0] * len(prompt) + lps)  # Atropos puts 1.0 where masked
            group["overrides"].append({})
        return group, []

    async def evaluate(self, *args, **kwargs) -> None:
        pass  # held-out eval of Digits runs in the trainer (env=synthetic); this env only feeds training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True, help="the Atropos run-api URL")
    parser.add_argument("--vllm", required=True, help="the vLLM server's OpenAI base URL (…/v1)")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--tokenizer", required=True, help="the model's tokenizer (a path or hub id)")
    parser.add_argument("--api-key", default="", help="the vLLM server's key, if it has one")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batches-offpolicy", type=int, default=1)
    args = parser.parse_args()
    config = BaseEnvConfig(group_size=args.group_size, tokenizer_name=args.tokenizer, rollout_server_url=args.api,
                           use_wandb=False, max_token_length=4096, total_steps=-1, steps_per_eval=0,
                           max_batches_offpolicy=args.max_batches_offpolicy, ensure_scores_are_not_same=False,
                           wandb_name="digits")
    # openai's client wants some key; a server without one ignores it
    server = APIServerConfig(base_url=args.vllm, model_name=args.model, server_type="vllm",
                             api_key=args.api_key or "none", tokenizer_name=args.tokenizer, timeout=120)
    env = DigitsAtroposEnv(config, [server], DigitsEnv(seed=args.seed), args.max_tokens)
    asyncio.run(env.env_manager())


if __name__ == "__main__":
    main()
