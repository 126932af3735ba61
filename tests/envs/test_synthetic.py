"""DigitsEnv: reward values by hand, deterministic sampling, exact resume."""

import pytest

from envs.synthetic import DigitsEnv, digit_fraction


@pytest.mark.parametrize(
    "text, reward",
    [("123", 1.0), ("12ab", 0.5), ("", 0.0), ("   \n", 0.0), (" 1 2 ", 1.0), ("abc", 0.0), ("1a2b3c4", 4 / 7), ("١٢٣", 0.0)],
)
def test_digit_fraction(text, reward):
    assert digit_fraction(text) == pytest.approx(reward)


def test_score_is_per_group():
    env = DigitsEnv(seed=0)
    prompts = env.sample(2)
    scores = env.score(prompts, [["123", "12ab"], ["", " 1 2 ", "x"]])
    assert scores == [[{"digits": 1.0}, {"digits": 0.5}], [{"digits": 0.0}, {"digits": 1.0}, {"digits": 0.0}]]
    assert [env.success(s) for g in scores for s in g] == [True, False, False, True, False]


def test_prompts_are_chat_messages_with_next_number_as_answer():
    p = DigitsEnv(seed=3).sample(1)[0]
    assert [m["role"] for m in p.messages] == ["system", "user"]
    assert "digits only" in p.messages[0]["content"]
    k = p.meta["k"]
    assert 0 <= k < 1000 and str(k) in p.messages[1]["content"] and p.answer == str(k + 1)


def _first_questions(seed: int) -> list[str]:
    return [p.messages[1]["content"] for p in DigitsEnv(seed=seed).sample(20)]


def test_sampling_is_deterministic_per_seed():
    assert _first_questions(0) == _first_questions(0)
    assert _first_questions(0) != _first_questions(1)


def test_state_dict_resumes_exact_next_prompts_across_epochs():
    env = DigitsEnv(seed=5, num_prompts=8)
    env.sample(13)  # one full epoch and 5 into the next, reshuffled
    state = env.state_dict()
    expected = env.sample(10)
    resumed = DigitsEnv(seed=5, num_prompts=8)
    resumed.load_state_dict(state)
    assert resumed.sample(10) == expected


def test_each_epoch_covers_every_prompt_once():
    env = DigitsEnv(seed=2, num_prompts=16)
    for _ in range(3):
        assert sorted(id(p) for p in env.sample(16)) == sorted(id(p) for p in env.prompts)


def test_corpus_has_prompt_text_and_digit_runs():
    env = DigitsEnv(seed=0, num_prompts=4)
    texts = list(env.corpus())
    assert any("digits only" in t for t in texts)
    runs = [t for t in texts if t.replace(" ", "").isdigit()]
    assert len(runs) == 4 and all(len(r.split()) == 8 for r in runs)


@pytest.mark.parametrize("seed, num_prompts", [(0, 512), (1, 512), (3, 64), (0, 900)])
def test_eval_start_numbers_are_never_training_ones(seed, num_prompts):
    env = DigitsEnv(seed=seed, num_prompts=num_prompts)
    trained = {p.meta["k"] for p in env.prompts}
    held = env.eval_prompts("test", len(env.test_prompts))
    ks = [p.meta["k"] for p in held]
    assert not trained & set(ks) and len(set(ks)) == len(ks)
    assert trained | set(ks) == set(range(1000))  # every number not trained on is held out
    assert all(str(p.meta["k"]) in p.messages[1]["content"] for p in held)


def test_eval_prompts_are_fixed_whatever_the_cursor_and_training_prompts_unchanged():
    env = DigitsEnv(seed=0)
    first = env.eval_prompts("test", 8)
    env.sample(100)
    assert env.eval_prompts("test", 8) == first == DigitsEnv(seed=0).eval_prompts("test", 8)
    # The training prompts are drawn as before eval splits existed (same draws, same default run).
    assert [p.meta["k"] for p in env.prompts[:5]] == [864, 776, 41, 988, 414]


def test_bad_eval_split_or_size_names_the_key():
    env = DigitsEnv(seed=0, num_prompts=990)
    with pytest.raises(ValueError, match="eval.split='validation': Digits has one held-out split, 'test'"):
        env.eval_prompts("validation", 4)
    with pytest.raises(ValueError, match=r"eval.num_prompts=500: eval.split='test' has only \d+ prompts"):
        env.eval_prompts("test", 500)
