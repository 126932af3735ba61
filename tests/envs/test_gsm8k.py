"""GSM8KEnv on the repository's copy (data/gsm8k), scored by real math-verify workers."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from envs.gsm8k import DATA, REPO_ROOT, BadDataError, GSM8KEnv, _is_hub_id, answer_format, gold_answer
from runtime.records import read_jsonl

SOURCE = None  # the default config's env.source: the repository's data/gsm8k


@pytest.fixture(scope="module")
def env():
    e = GSM8KEnv(SOURCE, split="train", seed=0)
    yield e
    e.close()


def test_loads_every_line_of_the_repository_copy(env):
    assert len(env.prompts) == len(read_jsonl(DATA / "train.jsonl")) == 7473
    assert env.bad_lines == 0
    test = GSM8KEnv(SOURCE, split="test")
    assert len(test.prompts) == 1319 and test.prompts[0].answer == "18"


def test_first_example(env):
    first = read_jsonl(DATA / "train.jsonl")[0]
    p = env.prompts[0]
    assert p.answer == "72" == first["answer"].split("####")[-1].strip()
    assert p.messages[1] == {"role": "user", "content": first["question"]}
    assert p.messages[0]["role"] == "system" and "\\boxed{}" in p.messages[0]["content"]


def test_gold_answer_strips_commas_and_space():
    assert gold_answer("5 * 200 = 1,000\n#### 1,000 ") == "1000"


def test_score_groups(env):
    p = env.prompts[0]  # gold 72
    q = env.prompts[1]  # gold 10
    completions = [
        ["48 + 24 = 72, so she sold \\boxed{72} clips.", "\\boxed{71}", "The answer is 72", "The answer is 18"],
        ["She earned $\\boxed{10}$.", ""],
    ]
    scores = env.score([p, q], completions)
    assert [[s["correct"] for s in g] for g in scores] == [[1.0, 0.0, 1.0, 0.0], [1.0, 0.0]]
    assert [[s["format"] for s in g] for g in scores] == [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0]]
    assert [[env.reward_weights.total(s) for s in g] for g in scores] == [[1.1, 0.1, 1.0, 0.0], [1.1, 0.0]]
    assert [env.success(s) for s in scores[0]] == [True, False, True, False]
    with pytest.raises(ValueError):
        env.score([p], completions)


def test_sampling_is_deterministic_and_resumes_exactly(env):
    a, b = GSM8KEnv(SOURCE, seed=7, max_examples=50), GSM8KEnv(SOURCE, seed=7, max_examples=50)
    assert [p.answer for p in a.sample(30)] == [p.answer for p in b.sample(30)]
    a.sample(45)  # into the second epoch
    state = a.state_dict()
    expected = a.sample(20)
    c = GSM8KEnv(SOURCE, seed=7, max_examples=50)
    c.load_state_dict(state)
    assert c.sample(20) == expected
    other = GSM8KEnv(SOURCE, seed=8, max_examples=50)
    assert [p.messages for p in other.sample(10)] != [p.messages for p in GSM8KEnv(SOURCE, seed=7, max_examples=50).sample(10)]


def test_jsonl_file_absolute_path_and_max_examples():
    e = GSM8KEnv(str(DATA.resolve() / "test.jsonl"), max_examples=5)
    assert [p.answer for p in e.prompts] == ["18", "3", "70000", "540", "20"]


def test_corpus_yields_questions_and_answers():
    texts = list(GSM8KEnv(SOURCE, max_examples=2).corpus())
    assert len(texts) == 4 and texts[1].endswith("#### 72")


@pytest.mark.parametrize("source", ["../no/such/gsm8k", "missing.jsonl", "/no/such/dir"])
def test_missing_local_data_names_path_and_config_key(source):
    with pytest.raises(FileNotFoundError, match="env.source") as info:
        GSM8KEnv(source)
    assert Path(source).name in str(info.value)


def test_default_source_is_the_repository_copy_from_any_cwd(tmp_path, monkeypatch):
    """A lone clone reads GSM8K from itself, wherever the command runs; the MIT licence travels too."""
    monkeypatch.chdir(tmp_path)
    assert DATA == REPO_ROOT / "data" / "gsm8k" and (DATA / "LICENSE").read_text().startswith("MIT License")
    e = GSM8KEnv(split="test", max_examples=3)
    assert [p.answer for p in e.prompts] == ["18", "3", "70000"]


def test_relative_source_starts_from_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert [p.answer for p in GSM8KEnv("mine").prompts] == ["2"]
    assert [p.answer for p in GSM8KEnv("./mine/train.jsonl").prompts] == ["2"]
    monkeypatch.chdir(REPO_ROOT)  # the same words typed elsewhere name nothing there
    with pytest.raises(FileNotFoundError, match=re.escape(f"env.source='./mine' names {REPO_ROOT / 'mine'}, which does not exist")):
        GSM8KEnv("./mine")


def test_no_local_data_and_no_hub_names_env_source(tmp_path):
    """A hub id with no network (and an empty hub cache): one error naming env.source, at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", "from envs.gsm8k import GSM8KEnv; GSM8KEnv('openai/gsm8k')"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: GSM8K data not found: env.source='openai/gsm8k' is no local path "
                           f"({tmp_path / 'openai' / 'gsm8k'}) and the hub did not give it"), last


def test_missing_split_in_existing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "validation.jsonl")):
        GSM8KEnv(str(tmp_path), split="validation")


def test_bad_lines_skipped_or_refused(tmp_path):
    good = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    (tmp_path / "train.jsonl").write_text("\n".join([json.dumps(good), "not json", json.dumps({"question": "q"}), ""]))
    e = GSM8KEnv(str(tmp_path))
    assert len(e.prompts) == 1 and e.bad_lines == 2
    with pytest.raises(BadDataError, match="train.jsonl:2"):
        GSM8KEnv(str(tmp_path), on_bad_line="error")


def test_hub_ids_go_to_datasets(monkeypatch):
    assert _is_hub_id("openai/gsm8k") and _is_hub_id("gsm8k")
    assert not any(map(_is_hub_id, ["../data/gsm8k", "/data/gsm8k", "data.jsonl", "./gsm8k", "~/gsm8k"]))
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"question": "How many?", "answer": "2 + 2 = 4\n#### 4"}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    e = GSM8KEnv("openai/gsm8k", split="test")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert e.prompts[0].answer == "4"


@pytest.mark.parametrize("completion, form", [
    ("so 5 + 3 = 8\n#### 8", 1.0), ("#### 1,000.5  \n", 1.0), ("#### -3", 1.0), ("The answer is \\boxed{72}.", 1.0),
    ("$\\boxed{\\frac{1}{2}}$", 1.0), ("72", 0.0), ("", 0.0), ("# 5", 0.0), ("boxed{5}", 0.0),
    ("#### 8 apples", 0.5), ("\\boxed{ }", 0.5), ("\\boxed{}", 0.5), ("x ####", 0.5),  # the marker alone: half
])
def test_format_component(completion, form):
    assert answer_format(completion) == form


def test_eval_split_is_the_test_file_with_no_training_question(env):
    held = env.eval_prompts("test", 5)
    assert [p.answer for p in held] == ["18", "3", "70000", "540", "20"]
    trained = {p.messages[1]["content"] for p in env.prompts}
    assert not trained & {p.messages[1]["content"] for p in env.eval_prompts("test", 1319)}


def test_bad_eval_split_names_the_key(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.split='validation': GSM8K data not found: .*validation.jsonl"):
        env.eval_prompts("validation", 4)
    with pytest.raises(ValueError, match="eval.split='train' is the training split"):
        env.eval_prompts("train", 4)
    with pytest.raises(ValueError, match="eval.num_prompts=2000: eval.split='test' has only 1319 prompts"):
        env.eval_prompts("test", 2000)
    with pytest.raises(ValueError, match="env.reward_weights.correctness"):
        GSM8KEnv(SOURCE, max_examples=1, reward_weights={"correctness": 1.0})
