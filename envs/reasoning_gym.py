"""reasoning-gym's procedurally generated, verifiable tasks (100+: arithmetic, logic, puzzles,
graphs...) as an env: `env=reasoning_gym env.task=basic_arithmetic`.

`task` is one task name, a list of names, or {name: weight}: several tasks mix, each prompt's task
drawn by weight. Every item is generated, never stored: item k of the training stream is item k of
its task's generator seeded with `seed`, so the state is one position and resume is exact. The
held-out split `test` draws from generators seeded `seed + EVAL_SEED`, seeds no training item uses
(reasoning-gym seeds item k with seed + k; a small task space may still repeat a question). A
prompt carries (task, split, index) only, and scoring regenerates the item to call the task's own
`score_answer`, so a score needs nothing but the prompt (JSON-safe: an env service scores what a
trainer sends back).

The answer scored is the last `<answer>...</answer>` of a completion (reasoning-gym's format), or
the whole completion, stripped, when it has none: a small model that answers bare is graded too.
One reward component, `correct` (the task's score, in [0, 1]; some tasks give partial credit,
which `partial_credit=false` rounds down to 0: exact answers only); a completion succeeds when it is 1.
"""

from __future__ import annotations

import random
from typing import Iterator, Mapping, Optional, Union

from grpo.data import Prompt, RewardWeights, Scores

SYSTEM = "Answer the question directly. Provide your answer between <answer> and </answer> tags."
EVAL_SEED = 1 << 32  # test split's generator seed offset: item seeds seed + k never reach it
CORPUS_ITEMS = 256  # per task, the training items whose text the tiny tokenizer learns


def task_weights(task: Union[str, list, Mapping[str, float]]) -> dict[str, float]:
    """`env.task` as {name: weight}: a name, a list of names (equal weights) or a mapping."""
    if isinstance(task, str):
        return {task: 1.0}
    if isinstance(task, Mapping):
        weights = {str(k): float(v) for k, v in task.items()}
    else:
        weights = {str(name): 1.0 for name in task}
    if not weights or any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"env.task={task}: give at least one task, with weights >= 0 not all 0")
    return weights


def _dataset(name: str, seed: int, config: Mapping):
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(f"env.task={name!r}: reasoning-gym has no such task; valid tasks: {sorted(DATASETS)}")
    try:
        # size only bounds iteration, which we never use: items are indexed, item k seeded seed + k
        return reasoning_gym.create_dataset(name, seed=seed, size=1 << 31, **dict(config))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(f"env.config.{name}={dict(config)}: reasoning-gym rejects it ({exc})") from exc


def extract_answer(completion: str) -> str:
    """The last <answer>...</answer>'s content, else the whole completion; stripped."""
    from reasoning_gym.utils import extract_answer as tagged

    found = tagged(completion)
    return (found if found is not None else completion).strip()


class ReasoningGymEnv:
    def __init__(self, task: Union[str, list, Mapping[str, float]] = "basic_arithmetic", seed: int = 0,
                 config: Optional[Mapping[str, Mapping]] = None, system_prompt: Optional[str] = SYSTEM,
                 reward_weights: Optional[Mapping[str, float]] = None, max_tokens: int = 32,
                 partial_credit: bool = True):
        self.weights = task_weights(task)
        config = dict(config or {})
        for name in config:
            if name not in self.weights:
                raise ValueError(f"env.config.{name}: {name!r} is not one of env.task's {sorted(self.weights)}")
        self.seed, self.system_prompt, self.max_tokens = seed, system_prompt, max_tokens
        # false: `correct` is 1 for the task's full score, else 0 (exact answers; basic_arithmetic's
        # own score gives len(oracle)/len(answer) to an answer that merely contains the oracle,
        # which GRPO's per-group scaling turns into full advantages for long junk answers)
        self.partial_credit = partial_credit
        # every unknown task and bad option fails here, at start, before vLLM starts
        self.datasets = {split: {name: _dataset(name, seed + offset, config.get(name, {})) for name in self.weights}
                         for split, offset in (("train", 0), ("test", EVAL_SEED))}
        self.position = 0
        self.reward_weights = RewardWeights({"correct": 1.0}, reward_weights)

    def _task(self, split: str, k: int) -> str:
        names = list(self.weights)
        if len(names) == 1:
            return names[0]
        return random.Random(f"reasoning-gym-{split}-{self.seed}-{k}").choices(names, list(self.weights.values()))[0]

    def _prompt(self, split: str, k: int) -> Prompt:
        task = self._task(split, k)
        item = self.datasets[split][task][k]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return Prompt(messages=[*system, {"role": "user", "content": item["question"]}], answer=str(item["answer"]),
                      meta={"task": task, "split": split, "index": k})

    def sample(self, n: int) -> list[Prompt]:
        prompts = [self._prompt("train", k) for k in range(self.position, self.position + n)]
        self.position += n
        return prompts

    def eval_prompts(self, split: str, n: int) -> list[Prompt]:
        if split != "test":
            raise ValueError(f"eval.split={split!r}: reasoning-gym envs have one held-out split, 'test' "
                             "(generators seeded apart from training's)")
        return [self._prompt("test", k) for k in range(n)]

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> Scores:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion groups")
        out = []
        for prompt, group in zip(prompts, completions):
            dataset = self.datasets[prompt.meta["split"]][prompt.meta["task"]]
            entry = dataset[prompt.meta["index"]]  # regenerated: the exact item, metadata included
            scores = [float(dataset.score_answer(extract_answer(c), entry)) for c in group]
            out.append([{"correct": s if self.partial_credit else float(s == 1.0)} for s in scores])
        return out

    def reference(self, prompt: Prompt) -> str:
        """The completion graded correct: the item's answer in the tags score() reads."""
        return f"<answer>{prompt.answer}</answer>"

    def success(self, components: Mapping[str, Optional[float]]) -> bool:
        return components["correct"] == 1.0

    def corpus(self) -> Iterator[str]:
        for name, dataset in self.datasets["train"].items():
            for k in range(CORPUS_ITEMS):
                item = dataset[k]
                yield item["question"]
                yield f"<answer>{item['answer']}</answer>"
        if self.system_prompt:
            yield self.system_prompt

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def close(self) -> None:
        pass
