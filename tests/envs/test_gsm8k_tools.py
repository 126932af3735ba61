"""GSM8K with a calculator: tool calls in the model's template format (a Qwen2.5-style template
on the tiny tokenizer: tools in the system turn, tool replies as `<tool_response>`), answered,
stitched prefix-preserving, and the final turn scored by math-verify."""

import json

import pytest
from transformers import AutoTokenizer

from envs.gsm8k_tools import GSM8KToolsEnv, ToolCallEpisode
from envs.calculator import Calculator
from grpo.data import Completion
from grpo.stitch import ChatTemplate
from lab.episodes import Episodes

# The structure of Qwen2.5-Instruct's template (tools into the system turn, assistant content
# verbatim, consecutive tool messages as one user turn of <tool_response> blocks).
QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0]['content'] }}\n\n# Tools\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n"
    "{%- set rest = messages[1:] %}{%- else %}{%- set rest = messages %}{%- endif %}"
    "{%- for message in rest %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or rest[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{%- endif %}"
    "{{ '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or rest[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


def call(expression, name="calculator"):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": {"expression": expression}}) + "\n</tool_call>"


def test_tool_calls_are_answered_in_order_and_bad_ones_get_an_error_message():
    episode = ToolCallEpisode(Calculator())
    reply = episode.step("First " + call("48/2") + " and " + call("3*(2+1)"))
    assert reply.messages == [{"role": "tool", "content": "24"}, {"role": "tool", "content": "9"}] and not reply.done
    reply = episode.step(call("1", name="search") + "<tool_call>{not json</tool_call>")
    assert [m["content"] for m in reply.messages] == ["error: no tool named 'search'; the tool is 'calculator'",
                                                      'error: a tool call is {"name": "calculator", "arguments": {"expression": "..."}}']
    assert reply.info == {"tool_calls": 2, "tool_errors": 2}
    assert episode.step("So the answer is \\boxed{24}.").done


class Scripted:
    max_tokens = 64

    def __init__(self, tokenizer, turns):
        self.tokenizer, self.turns, self.k = tokenizer, turns, 0

    def _turn(self, text):
        ids = self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
        return Completion(ids, [-0.5] * len(ids), text, "stop")

    def generate(self, prompt_ids, n, seed=None, stop_token_ids=()):
        return [[self._turn(self.turns[0]) for _ in range(n)] for _ in prompt_ids]

    def continue_each(self, prompt_ids, seeds, max_tokens, stop_token_ids=()):
        self.k += 1
        return [self._turn(self.turns[self.k]) for _ in prompt_ids]


@pytest.fixture(scope="module")
def env():
    env = GSM8KToolsEnv(max_examples=16)
    yield env
    env.close()


def test_an_episode_in_a_qwen_style_template_is_stitched_and_its_final_turn_scored(tiny_model_path, env):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.chat_template = QWEN_STYLE
    template = ChatTemplate(tokenizer, "qwen-style", env.tools)
    loop = Episodes(env, template, max_turns=4, max_total_tokens=None)  # the template check passes
    prompt = env.sample(1)[0]
    prompt_ids = loop.encode(prompt.messages)
    assert '"name": "calculator"' in tokenizer.decode(prompt_ids)  # the schema is in the prompt
    answer = f"The answer is \\boxed{{{prompt.answer}}}."
    groups = loop.generate(Scripted(tokenizer, [call("6*7"), answer]), [prompt], [prompt_ids], 2, seed=1, stride=2)
    c = groups[0][0]
    env_text = tokenizer.decode([t for t, m in zip(c.token_ids, c.mask) if m == 0])
    assert env_text == "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    conversation = prompt.messages + c.dialogue.messages
    assert prompt_ids + c.token_ids == template.render(conversation)[:len(prompt_ids) + len(c.token_ids)]
    assert loop.score([prompt], groups) == [[{"correct": 1.0, "format": 1.0, "used_tool": 1.0}] * 2]
    assert env.reward_weights.weights == {"correct": 1.0, "format": 0.1, "used_tool": 0.0}
