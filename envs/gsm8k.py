"""GSM8K: grade-school maths word problems, reward by math-verify against the `####` answer.

`source` is a local directory holding `{split}.jsonl`, a `.jsonl` file (a relative path starts
from the directory the command was typed in), or a hub dataset id (`openai/gsm8k`); unset, the
copy in the repository, `data/gsm8k` (MIT, openai/grade-school-math), so a lone clone trains
offline.

Reward components: `correct` (math-verify finds the gold answer) and `format`: 1.0 when the
completion gives its answer in a form a grader can find (ending in the dataset's `#### <number>`,
or a `\\boxed{...}` answer), 0.5 when it has the marker (`####`, `\\boxed{`) but no such answer.
The half step is what makes `format` reachable for a tiny random model, where `correct` is not:
measured on its GSM8K completions, 15 % hold `####`, 1 % `#### <number>`, none end in it. So a CPU
run has something to learn while `correct` is reported as it is. Eval splits are the source's other
files (`test`); a question that is also a training question is dropped from them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Mapping, Optional

from envs.base import PromptListEnv, PromptSampler, held_out
from grpo.data import Prompt, RewardWeights, Scores
from envs.verifier import MathVerifier
from grpo import REPO_ROOT

DATA = REPO_ROOT / "data" / "gsm8k"  # env.source unset: the repository's copy, wherever the command runs

SYSTEM = (
    "Solve the problem step by step, then give the final answer as a number in \\boxed{}."
)


# Default weights: correctness is the goal; format a small shaping term, small enough that a run
# never prefers a well-formed wrong answer to a correct one.
REWARD_WEIGHTS = {"correct": 1.0, "format": 0.1}
ANSWER_FORM = re.compile(r"####\s*[-+]?[\d,]*\.?\d+\s*$|\\boxed\{\s*[^}\s]")
ANSWER_MARKER = re.compile(r"####|\\boxed\{")


def answer_format(completion: str) -> float:
    """1.0 if the completion ends in `#### <number>` or has a non-empty `\\boxed{...}`; 0.5 if it
    has only the marker; else 0.0."""
    if ANSWER_FORM.search(completion):
        return 1.0
    return 0.5 if ANSWER_MARKER.search(completion) else 0.0


class BadDataError(ValueError):
    """A data line is not a GSM8K record (and env.on_bad_line=error)."""


def gold_answer(solution: str) -> str:
    """'...#### 1,000' -> '1000'."""
    return solution.split("####")[-1].strip().replace(",", "")


def _is_hub_id(source: str) -> bool:
    """'openai/gsm8k' is a hub id; '../data/gsm8k', '/data/x', 'a.jsonl' are paths."""
    return source.count("/") <= 1 and not source.startswith((".", "/", "~")) and not source.endswith(".jsonl")


def _read_jsonl(path: Path, on_bad_line: str) -> tuple[list[dict], int]:
    records, bad = [], 0
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec.get("question"), str) or "####" not in rec.get("answer", ""):
                raise ValueError("needs 'question' and an 'answer' containing '####'")
        except (ValueError, AttributeError) as exc:
            if on_bad_line == "error":
                raise BadDataError(f"{path}:{lineno}: not a GSM8K record ({exc}); "
                                   "set env.on_bad_line=skip to skip such lines") from exc
            bad += 1
            continue
        records.append(rec)
    return records, bad


class GSM8KEnv(PromptListEnv):
    def __init__(
        self,
        source: Optional[str] = None,
        split: str = "train",
        seed: int = 0,
        system_prompt: str = SYSTEM,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        max_examples: Optional[int] = None,
        on_bad_line: str = "skip",
        reward_weights: Optional[Mapping[str, float]] = None,
        max_tokens: int = 256,
    ):
        self.max_tokens = max_tokens
        if on_bad_line not in ("skip", "error"):
            raise ValueError(f"env.on_bad_line={on_bad_line!r} is not one of ['skip', 'error']")
        self.source, self.split, self.on_bad_line, self.system_prompt = source, split, on_bad_line, system_prompt
        self.reward_weights = RewardWeights(REWARD_WEIGHTS, reward_weights)
        self.records, self.bad_lines = self._load(source, split, on_bad_line)
        if max_examples is not None:
            self.records = self.records[:max_examples]
        self.prompts = [self._prompt(r) for r in self.records]
        self.sampler = PromptSampler(self.prompts, seed)
        self.verifier = MathVerifier(num_workers, timeout_s)

    def _prompt(self, record: dict) -> Prompt:
        return Prompt(messages=[{"role": "system", "content": self.system_prompt},
                                {"role": "user", "content": record["question"]}],
                      answer=gold_answer(record["answer"]))

    @staticmethod
    def _load(source: Optional[str], split: str, on_bad_line: str) -> tuple[list[dict], int]:
        local = DATA if source is None else Path(source).expanduser().absolute()  # relative: from the cwd
        hint = (f"set env.source to a directory holding {split}.jsonl, a .jsonl file, or a hub id like "
                f"openai/gsm8k; unset, it is the repository's copy {DATA}")
        if source is None or local.exists() or not _is_hub_id(source):
            path = local / f"{split}.jsonl" if local.is_dir() else local
            if not path.exists():
                raise FileNotFoundError(f"GSM8K data not found: env.source={source!r} names {path}, which does not "
                                        f"exist ({hint})")
            return _read_jsonl(path, on_bad_line)
        from datasets import load_dataset

        try:
            return [dict(r) for r in load_dataset(source, "main", split=split)], 0
        except OSError as exc:  # no network, or no such dataset (FileNotFoundError)
            raise FileNotFoundError(f"GSM8K data not found: env.source={source!r} is no local path ({local}) and "
                                    f"the hub did not give it ({type(exc).__name__}: {exc}) ({hint})") from exc

    def eval_prompts(self, split: str, n: int) -> list[Prompt]:
        if split == self.split:
            raise ValueError(f"eval.split={split!r} is the training split (env.split); evaluate on another, e.g. 'test'")
        try:
            records, _ = self._load(self.source, split, self.on_bad_line)
        except (FileNotFoundError, ValueError) as exc:  # ValueError: a hub dataset without that split
            raise type(exc)(f"eval.split={split!r}: {exc}") from exc
        trained = {r["question"] for r in self.records}
        return held_out([self._prompt(r) for r in records if r["question"] not in trained], n, split)

    def score(self, prompts: list[Prompt], completions: list[list[str]]) -> Scores:
        """All completions of all prompts go to the verifier in one call, so they run in parallel."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion groups")
        pairs = [(c, p.answer) for p, group in zip(prompts, completions) for c in group]
        flat = iter(self.verifier.score(pairs))
        return [[{"correct": next(flat), "format": answer_format(c)} for c in group] for group in completions]

    def reference(self, prompt: Prompt) -> str:
        """The completion graded correct with full format credit: the dataset's `#### <answer>`."""
        return f"#### {prompt.answer}"

    def success(self, components: Mapping[str, Optional[float]]) -> bool:
        return components["correct"] == 1.0

    def corpus(self) -> Iterator[str]:
        for r in self.records:
            yield r["question"]
            yield r["answer"]

    def close(self) -> None:
        self.verifier.close()
