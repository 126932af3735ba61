"""The calculator (safe AST allow-list, never eval) and the Calc env: tool replies, errors as
messages, rewards by hand, held-out questions."""

import pytest

from envs.calc import CalcEnv, CalcEpisode, answer_of
from envs.calculator import CalcError, Calculator


@pytest.mark.parametrize("expression, value", [
    ("37*41", "1517"), (" 2 + 3 * (4 - 1) ", "11"), ("7/2", "3.5"), ("8/2", "4"), ("7//2", "3"), ("-7 % 3", "2"),
    ("2**10", "1024"), ("-(3)", "-3"), ("1.5*2", "3"), ("1/3", "0.3333333333"),
])
def test_calculator_values(expression, value):
    assert Calculator()(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "only numbers"), ("abs(-1)", "only numbers"), ("x+1", "only numbers"),
    ("'a'*3", "only numbers"), ("[1]*3", "only numbers"), ("1 if 1 else 2", "only numbers"), ("1 < 2", "only numbers"),
    ("1/0", "division by zero"), ("5 % 0", "division by zero"), ("9**99", "exponent above 16"),
    ("10**15*10", "magnitude above"), ("2.0**-1000000", "exponent above"), ("1e300*1e300", "magnitude above"),
    ("1" * 65, "longer than 64"), ("", "empty"), ("3 +", "not an arithmetic expression"), ("(-8)**0.5", "magnitude"),
])
def test_calculator_refuses_with_a_message_never_evaluates(expression, message):
    with pytest.raises(CalcError, match=message) as err:
        Calculator()(expression)
    assert str(err.value).startswith("error: ")


def test_a_turn_ending_in_a_call_gets_the_value_a_bad_call_an_error_message_any_other_ends_the_episode():
    episode = CalcEpisode(Calculator())
    reply = episode.step("let me see <calc>37*41</calc>")
    assert (reply.messages, reply.done, reply.info) == ([{"role": "tool", "content": "1517"}], False,
                                                        {"tool_calls": 1, "tool_errors": 0})
    reply = episode.step("<calc>37*/41</calc>")
    assert reply.messages == [{"role": "tool", "content": "error: not an arithmetic expression"}] and not reply.done
    assert reply.info == {"tool_calls": 1, "tool_errors": 1}
    assert episode.step("12</calc>").messages == [{"role": "tool", "content": "12"}]  # from the turn's start
    assert episode.step("1517").done and episode.step("<calc>1+1").done  # no closing tag: no call


@pytest.mark.parametrize("text, answer", [("1517", "1517"), ("it is 1517.", "1517"), ("<calc>2*3</calc> 6", "6"),
                                          ("<calc>2*3</calc>", None), ("-4", "-4"), ("no number", None)])
def test_answer_is_the_last_number_outside_tool_calls(text, answer):
    assert answer_of(text) == answer


def test_scores_correct_and_used_tool_by_hand():
    env = CalcEnv(seed=0, num_prompts=8)
    prompt = env.sample(1)[0]
    a = prompt.answer
    called = [{"role": "assistant", "content": "<calc>x</calc>"}, {"role": "tool", "content": "error: only numbers"},
              {"role": "assistant", "content": "<calc>6*7</calc>"}, {"role": "tool", "content": "42"},
              {"role": "assistant", "content": a}]
    refused = called[:2] + [{"role": "assistant", "content": "0"}]
    assert env.score([prompt], [[called, refused, [{"role": "assistant", "content": a}]]]) == \
        [[{"correct": 1.0, "used_tool": 1.0}, {"correct": 0.0, "used_tool": 0.5}, {"correct": 1.0, "used_tool": 0.0}]]
    assert env.success({"correct": 1.0, "used_tool": 0.0}) and not env.success({"correct": 0.0, "used_tool": 1.0})


def test_questions_need_the_tool_and_the_test_split_is_held_out():
    env = CalcEnv(seed=0, num_prompts=64)
    prompts = env.sample(64)
    for p in prompts:
        assert p.messages[-1]["content"] == f"What is {p.meta['expression']}?"
        assert Calculator()(p.meta["expression"]) == p.answer
    trained = {p.messages[-1]["content"] for p in env.prompts}
    test = env.eval_prompts("test", 32)
    assert len(test) == 32 and not trained & {p.messages[-1]["content"] for p in test}
    with pytest.raises(ValueError, match="eval.split='train'"):
        env.eval_prompts("train", 4)


def test_resume_draws_the_same_prompts():
    env = CalcEnv(seed=3)
    env.sample(5)
    state = env.state_dict()
    after = env.sample(4)
    again = CalcEnv(seed=3)
    again.load_state_dict(state)
    assert [p.answer for p in again.sample(4)] == [p.answer for p in after]
