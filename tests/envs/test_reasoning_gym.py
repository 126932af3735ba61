"""reasoning-gym tasks as an env: seeded generation we control, exact resume, a held-out split on
other seeds, the task's own scorer, weighted task mixes, and bad names failing at start."""

from __future__ import annotations

import collections

import pytest
import reasoning_gym

from conftest import make_cfg
from envs.reasoning_gym import EVAL_SEED, ReasoningGymEnv, extract_answer


def test_prompts_are_reasoning_gyms_items_seeded_by_us():
    env = ReasoningGymEnv(task="basic_arithmetic", seed=7)
    prompts = env.sample(5)
    reference = reasoning_gym.create_dataset("basic_arithmetic", seed=7, size=5)
    assert [p.messages[-1]["content"] for p in prompts] == [reference[k]["question"] for k in range(5)]
    assert [p.answer for p in prompts] == [reference[k]["answer"] for k in range(5)]
    assert [p.meta for p in prompts] == [{"task": "basic_arithmetic", "split": "train", "index": k} for k in range(5)]
    assert ReasoningGymEnv(seed=8).sample(5) != prompts


def test_resume_is_exact():
    env = ReasoningGymEnv(task={"basic_arithmetic": 1, "leg_counting": 1}, seed=1)
    env.sample(11)
    state = env.state_dict()
    expected = env.sample(6)
    resumed = ReasoningGymEnv(task={"basic_arithmetic": 1, "leg_counting": 1}, seed=1)
    resumed.load_state_dict(state)
    assert resumed.sample(6) == expected


def test_held_out_split_uses_other_seeds_and_is_fixed():
    env = ReasoningGymEnv(task="basic_arithmetic", seed=0)
    held = env.eval_prompts("test", 4)
    reference = reasoning_gym.create_dataset("basic_arithmetic", seed=EVAL_SEED, size=4)
    assert [p.messages[-1]["content"] for p in held] == [reference[k]["question"] for k in range(4)]
    env.sample(50)
    assert env.eval_prompts("test", 4) == held
    # no held-out item shares a generator seed with a training item (item k: seed + k)
    assert {d.seed for d in env.datasets["test"].values()} == {EVAL_SEED}
    with pytest.raises(ValueError, match=r"eval.split='validation'.*'test'"):
        env.eval_prompts("validation", 4)


def test_scores_with_the_tasks_own_score_answer():
    env = ReasoningGymEnv(task="basic_arithmetic", seed=0)
    [prompt] = env.sample(1)
    answer = prompt.answer
    scores = env.score([prompt], [[f"thinking <answer>{answer}</answer>", f" {answer}\n", "<answer>12</answer>",
                                   f"<answer>x{answer}</answer>"]])
    dataset = reasoning_gym.create_dataset("basic_arithmetic", seed=0, size=1)
    partial = dataset.score_answer(f"x{answer}", dataset[0])
    assert partial == pytest.approx(len(answer) / (len(answer) + 1))  # the task's partial credit
    assert scores == [[{"correct": 1.0}, {"correct": 1.0}, {"correct": 0.0}, {"correct": partial}]]
    assert [env.success(s) for s in scores[0]] == [True, True, False, False]


def test_answer_is_the_last_tag_or_the_bare_text():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("  42 \n") == "42"


def test_weighted_mix_draws_tasks_by_weight():
    env = ReasoningGymEnv(task={"basic_arithmetic": 3, "leg_counting": 1}, seed=0)
    counts = collections.Counter(p.meta["task"] for p in env.sample(2000))
    assert counts["basic_arithmetic"] / 2000 == pytest.approx(0.75, abs=0.03)
    assert ReasoningGymEnv(task=["basic_arithmetic", "leg_counting"]).weights == {"basic_arithmetic": 1.0,
                                                                                 "leg_counting": 1.0}


def test_generator_options_reach_the_task():
    env = ReasoningGymEnv(task="basic_arithmetic", config={"basic_arithmetic": {"min_terms": 2, "max_terms": 2,
                                                                                "min_digits": 1, "max_digits": 1}})
    # two one-digit terms, e.g. "Calculate 5 - 3." or "Calculate ( -9 / 9 )."
    assert all(len([t for t in p.messages[-1]["content"].split() if t.strip("-.").isdigit()]) == 2
               for p in env.sample(20))


def test_unknown_task_and_option_fail_at_start_naming_key_and_value():
    with pytest.raises(ValueError, match=r"env.task='no_such_task'.*valid tasks: \[.*'basic_arithmetic'"):
        ReasoningGymEnv(task=["basic_arithmetic", "no_such_task"])
    with pytest.raises(ValueError, match=r"env.config.basic_arithmetic=\{'bogus': 1\}"):
        ReasoningGymEnv(config={"basic_arithmetic": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"env.config.leg_counting"):
        ReasoningGymEnv(config={"leg_counting": {}})


def test_config_group_composes_a_weighted_mix():
    from hydra.utils import instantiate

    cfg = make_cfg("env=reasoning_gym", "env.task={basic_arithmetic: 2, leg_counting: 1}",
                   "+env.config.leg_counting.min_animals=2", "train.seed=4")
    env = instantiate(cfg.env)
    assert env.weights == {"basic_arithmetic": 2.0, "leg_counting": 1.0} and env.seed == 4
    assert env.datasets["train"]["leg_counting"].config.min_animals == 2
    assert cfg.rollout.max_tokens == env.max_tokens == 32


def test_arith_env_is_small_exact_and_graded_on_hand_made_answers():
    """env=arith: two terms of 1-2 digits, + and -, no system prompt; `correct` is exact (a wrong,
    malformed or merely containing answer scores 0), and the reference answer is a success."""
    from hydra.utils import instantiate

    env = instantiate(make_cfg("env=arith").env)
    prompts = env.sample(200)
    for p in prompts:
        a, op, b = p.messages[-1]["content"].removeprefix("Calculate ").removesuffix(".").split()
        assert op in "+-" and 0 <= int(a) <= 100 and 0 <= int(b) <= 100 and len(p.messages) == 1
        assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    prompt = next(p for p in prompts if len(p.answer) == 2 and p.answer[0] != "-")  # e.g. 55
    right, wrong = f"<answer>{prompt.answer}</answer>", f"<answer>{int(prompt.answer) + 1}</answer>"
    completions = [right, prompt.answer, f" <answer> {prompt.answer} </answer>", wrong, "<answer></answer>",
                   f"<answer>{prompt.answer}0</answer>", f"{prompt.answer} {prompt.answer}", "", "<answer>fifty"]
    scores = [s["correct"] for s in env.score([prompt], [completions])[0]]
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert env.reference(prompt) == right and env.success({"correct": 1.0}) and not env.success({"correct": 0.0})
    # reasoning-gym's own partial credit, which env=arith turns off: an answer containing the right one
    partial = instantiate(make_cfg("env=arith", "env.partial_credit=true").env)
    assert partial.score([prompt], [[f"<answer>{prompt.answer}0</answer>"]])[0][0]["correct"] == pytest.approx(2 / 3)
