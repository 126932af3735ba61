"""Token stitching (grpo/stitch.py): prompt ids + sampled ids + env ids are the ids of the whole
conversation rendered at once, token for token; a template that is not prefix-preserving is
refused by name."""

import random

import pytest
from transformers import AutoTokenizer

from grpo.stitch import ChatTemplate, NotPrefixPreserving

WORDS = ["What", " is", " 37", "*", "41", "?", " the", " answer", " 12", " -", "3", " ok", "\n", " (", ")", "."]


def random_text(rng: random.Random, k: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(1, k))).strip() or "x"


@pytest.fixture(scope="module")
def tokenizer(calc_model_path):
    return AutoTokenizer.from_pretrained(calc_model_path)


@pytest.mark.parametrize("seed", range(25))
def test_stitched_turns_are_the_whole_conversation_rendered_at_once(tokenizer, seed):
    rng = random.Random(seed)
    template = ChatTemplate(tokenizer, "tiny-calc")
    conversation = [{"role": "system", "content": random_text(rng, 6)}, {"role": "user", "content": random_text(rng, 8)}]
    ids = template.prompt_ids(conversation)
    for _ in range(rng.randint(1, 4)):
        call = rng.random() < 0.5  # a turn that stops on the tool's `</calc>`: no EOS of its own
        content = f"<calc>{random_text(rng, 4)}</calc>" if call else random_text(rng, 8)
        sampled = tokenizer(content, add_special_tokens=False).input_ids + ([] if call else [tokenizer.eos_token_id])
        conversation.append({"role": "assistant", "content": content})
        reply = [{"role": rng.choice(["tool", "user"]), "content": random_text(rng, 5)}]
        ids += sampled + template.env_ids(conversation, reply, ended_on_eos=not call)
        conversation += reply
    assert ids == template.render(conversation, add_generation_prompt=True)


def test_tool_tags_are_single_tokens(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer("<calc>37*41</calc>").input_ids) == \
        ["<calc>", "3", "7", "*", "4", "1", "</calc>"]


def test_env_ids_after_a_tool_call_are_the_templates_close_and_the_tool_message(tokenizer):
    template = ChatTemplate(tokenizer, "tiny-calc")
    conversation = [{"role": "user", "content": "What is 37*41?"}, {"role": "assistant", "content": "<calc>37*41</calc>"}]
    env = template.env_ids(conversation, [{"role": "tool", "content": "1517"}], ended_on_eos=False)
    assert tokenizer.decode(env) == "<|im_end|>\n<|im_start|>tool\n1517<|im_end|>\n<|im_start|>assistant\n"
    env = template.env_ids(conversation, [{"role": "tool", "content": "1517"}], ended_on_eos=True)
    assert tokenizer.decode(env) == "\n<|im_start|>tool\n1517<|im_end|>\n<|im_start|>assistant\n"


# Like Qwen3's template dropping earlier turns' reasoning: an assistant turn renders differently
# once another message follows it.
FORGETFUL = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n[turn]<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


def test_a_template_that_is_not_prefix_preserving_is_refused_by_name(calc_model_path):
    tokenizer = AutoTokenizer.from_pretrained(calc_model_path)
    ChatTemplate(tokenizer, "tiny-calc").check_prefix_preserving()  # the tiny template passes
    tokenizer.chat_template = FORGETFUL
    with pytest.raises(NotPrefixPreserving, match=r"forgetful-model: its chat template is not prefix-preserving"):
        ChatTemplate(tokenizer, "forgetful-model").check_prefix_preserving()
