"""A multi-turn env served by `python -m envs.serve` and reached through `env=remote` answers the
episode loop as the local env does (the same tests run on both: replies, scores, budget), a step
is idempotent on (id, turn), a restarted service ends only the episodes it lost, and a refused
request stops the run where any other episode error would not."""

from __future__ import annotations

from typing import Iterator

import pytest
from transformers import AutoTokenizer

from envs.calc import CalcEnv
from envs.episode import StopRun, end, is_multi_turn
from envs.remote import EnvServiceError, Gone, RemoteEnv
from envs.serve import free_port, served, spawn
from envs.service import prompt_to_json
from grpo.stitch import ChatTemplate
from lab.episodes import Episodes
from support import ScriptedClient

BUDGET = {"max_tokens": 16, "max_turns": 3, "max_total_tokens": 96}  # conf/env/calc.yaml's
SCRIPT = ["let me see <calc>37*41</calc>", "<calc>37*/41</calc>", "12</calc>", "it is 1517"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with served("env=calc", "train.seed=3") as url:
        yield url


@pytest.fixture(params=["local", "served"])
def make_env(request, url):
    """The env under test, built locally or reached through its service: the same tests run on both."""
    def make():
        return CalcEnv(seed=3) if request.param == "local" else \
            RemoteEnv(url=url, timeout_s=30, retries=1, backoff_s=0.1, **BUDGET)
    return make


def play(env, prompt, seed: int = 0) -> list[dict]:
    """The episode's dialogue for SCRIPT's turns (up to the one the env ends it on), as the loop builds it."""
    episode, dialogue = env.start(prompt, seed), []
    for text in SCRIPT:
        reply = episode.step(text)
        dialogue.append({"role": "assistant", "content": text})
        if reply.done:
            break
        dialogue += reply.messages
    end(episode)
    return dialogue


def test_it_is_multi_turn_with_the_envs_budget_stop_tokens_and_tools(make_env):
    env, local = make_env(), CalcEnv(seed=3)
    assert is_multi_turn(env)
    for key in ("max_tokens", "max_turns", "max_total_tokens", "stop_tokens", "tools", "max_tool_chars"):
        assert getattr(env, key) == getattr(local, key), key


def test_replies_and_scores_are_the_envs(make_env):
    env, local = make_env(), CalcEnv(seed=3)
    prompts = env.sample(2)
    assert prompts == local.sample(2)
    episode = env.start(prompts[0], 5)
    replies = [episode.step(text) for text in SCRIPT]
    expected = local.start(prompts[0], 5)
    assert replies == [expected.step(text) for text in SCRIPT]
    assert [r.messages for r in replies[:3]] == [[{"role": "tool", "content": c}] for c in
                                                 ("1517", "error: not an arithmetic expression", "12")]
    dialogues = [[play(env, p, seed), [{"role": "assistant", "content": p.answer}]] for seed, p in enumerate(prompts)]
    assert env.score(prompts, dialogues) == local.score(prompts, dialogues)
    assert env.score(prompts, dialogues)[0][1] == {"correct": 1.0, "used_tool": 0.0}


def test_another_episode_budget_fails_at_start_naming_the_key(url):
    with pytest.raises(ValueError, match=r"env.max_turns=1: the served env's env.max_turns is 3; set env.max_turns=3"):
        RemoteEnv(url=url, max_tokens=16)
    with pytest.raises(ValueError, match=r"env.max_total_tokens=None: .* is 96; set env.max_total_tokens=96"):
        RemoteEnv(url=url, max_tokens=16, max_turns=3)


def test_a_repeated_step_answers_the_cached_reply_and_delete_ends_the_episode(url):
    service = RemoteEnv(url=url, **BUDGET).services[0]
    prompt = CalcEnv(seed=3).sample(1)[0]
    path = "/episodes/" + service.call("POST", "/episodes", {"prompt": prompt_to_json(prompt), "seed": 0})["id"]
    first = service.call("POST", path + "/step", {"turn": 1, "text": "<calc>1+1</calc>"})
    # a retry of turn 1 (its answer was lost): the env does not see it again, whatever the text
    assert service.call("POST", path + "/step", {"turn": 1, "text": "<calc>2+2</calc>"}) == first
    assert first["messages"] == [{"role": "tool", "content": "2"}]
    with pytest.raises(StopRun, match=r"turn 3 after turn 1"):  # out of turn: a 4xx, the run stops
        service.call("POST", path + "/step", {"turn": 3, "text": "x"})
    assert service.call("DELETE", path) == {}
    with pytest.raises(Gone, match=rf"POST {path}/step to env service at env.url={url}: HTTP 404"):
        service.call("POST", path + "/step", {"turn": 2, "text": "1"})


def test_a_restarted_service_ends_only_the_episodes_it_lost_as_env_errors():
    port = free_port()
    proc = spawn("env=calc", "train.seed=3", port=port)
    try:
        env = RemoteEnv(url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.1, timeout_s=5, **BUDGET)
        prompt = env.sample(1)[0]
        lost = env.start(prompt, 0)
        assert lost.step(SCRIPT[0]).messages == [{"role": "tool", "content": "1517"}]
        proc.kill()
        proc.wait()
        proc = spawn("env=calc", "train.seed=3", port=port)  # a supervisor restarts it
        with pytest.raises(Gone) as err:
            lost.step(SCRIPT[1])
        assert not isinstance(err.value, StopRun)  # the loop's `error` stop: NaN reward, the run goes on
        assert play(env, prompt) == play(CalcEnv(seed=3), prompt)  # new episodes are served as before
        end(lost)  # deleting an episode the service lost is harmless
    finally:
        proc.kill()
        proc.wait()


def test_a_refused_request_stops_the_run_other_faults_end_one_episode(url):
    env = RemoteEnv(url=url, **BUDGET)
    with pytest.raises(StopRun, match=rf"POST /episodes to env service at env.url={url}: HTTP 422"):
        env.services[0].call("POST", "/episodes", {"prompt": {"messages": []}})
    assert issubclass(Gone, EnvServiceError) and not issubclass(Gone, StopRun)


def test_a_single_turn_service_stays_single_turn():
    with served("env=synthetic") as url:
        env = RemoteEnv(url=url)
        assert not is_multi_turn(env) and env.max_turns == 1 and env.max_total_tokens is None


# -- through the trainer's episode loop (lab/episodes.py), sampled by a scripted client ------------

@pytest.fixture(scope="module")
def tokenizer(calc_model_path):
    return AutoTokenizer.from_pretrained(calc_model_path)


def loop_run(tokenizer, env, client):
    """One step's episodes of 2 prompts x 2 and their scores, as the trainer runs them."""
    loop = Episodes(env, ChatTemplate(tokenizer, "tiny-calc", env.tools), env.max_turns, env.max_total_tokens)
    prompts = env.sample(2)
    groups = loop.generate(client, prompts, [loop.encode(p.messages) for p in prompts], 2, 7, stride=4)
    return groups, loop.score(prompts, groups)


SCRIPTED = [("<calc>37*41</calc>", False), ("<calc>1/0</calc>", False), ("1517", True)]


def test_the_loop_runs_served_episodes_as_local_ones(tokenizer, url):
    local = loop_run(tokenizer, CalcEnv(seed=3), ScriptedClient(tokenizer, SCRIPTED))
    remote = loop_run(tokenizer, RemoteEnv(url=url, **BUDGET), ScriptedClient(tokenizer, SCRIPTED))
    assert remote == local
    dialogue = local[0][0][0].dialogue
    assert dialogue.stop == "eos" and [m["content"] for m in dialogue.messages if m["role"] == "tool"] == \
        ["1517", "error: division by zero"]
    assert local[1][0][0]["used_tool"] == 1.0


def test_the_loop_ends_episodes_a_restarted_service_lost_as_env_errors_and_goes_on(tokenizer):
    port = free_port()
    proc = spawn("env=calc", "train.seed=3", port=port)

    class Restarting(ScriptedClient):
        """The service dies and comes back while turn 2 is sampled: it has lost every episode."""

        def continue_each(self, *args, **kwargs):
            nonlocal proc
            proc.kill()
            proc.wait()
            proc = spawn("env=calc", "train.seed=3", port=port)
            return super().continue_each(*args, **kwargs)

    try:
        env = RemoteEnv(url=f"http://127.0.0.1:{port}", retries=1, backoff_s=0.1, timeout_s=5, **BUDGET)
        groups, scores = loop_run(tokenizer, env, Restarting(tokenizer, SCRIPTED))
        assert {c.dialogue.stop for g in groups for c in g} == {"error"}
        assert all("HTTP 404" in c.dialogue.error and set(c.mask) == {0} for g in groups for c in g)
        assert scores == [[{"correct": None, "used_tool": None}] * 2] * 2  # NaN rewards, counted
        assert loop_run(tokenizer, env, ScriptedClient(tokenizer, SCRIPTED))[0][0][0].dialogue.stop == "eos"
    finally:
        proc.kill()
        proc.wait()


def test_the_loop_deletes_every_episode_it_is_done_with(tokenizer, url):
    env, started = RemoteEnv(url=url, **BUDGET), []
    start = env.start

    def recorded(prompt, seed):
        started.append(start(prompt, seed))
        return started[-1]

    env.start = recorded
    loop_run(tokenizer, env, ScriptedClient(tokenizer, SCRIPTED))
    assert len(started) == 4
    for episode in started:
        with pytest.raises(Gone):
            episode.step("1")


def test_a_refused_step_stops_the_loop_naming_the_url_and_the_request(tokenizer):
    class WrongKey(ScriptedClient):
        """The trainer's key stops matching while turn 2 is sampled (a 401 on the next step)."""

        def continue_each(self, *args, **kwargs):
            env.services[0].session.headers["Authorization"] = "Bearer wrong"
            return super().continue_each(*args, **kwargs)

    with served("env=calc", "train.seed=3", "server.api_key=s3cret") as url:
        env = RemoteEnv(url=url, api_key="s3cret", **BUDGET)
        with pytest.raises(StopRun, match=rf"POST /episodes/\w+/step to env service at env.url={url}: HTTP 401"):
            loop_run(tokenizer, env, WrongKey(tokenizer, SCRIPTED))
