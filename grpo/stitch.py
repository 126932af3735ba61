"""Token stitching for multi-turn rollouts: the env's tokens between two assistant turns are the
difference of two renders of the chat template, never a re-tokenization of what the model sampled.

    before = render(conversation)                         # ends with the last assistant turn
    after  = render(conversation + env messages, add_generation_prompt=True)
    env ids = after[cut:], cut = just after before's last EOS (TRL `_get_tool_suffix_ids`, SkyRL)

A turn that stopped on a tool's stop token (`</calc>`) has no EOS of its own: the template's
closing EOS then belongs to the env (cut just before it), so prompt + sampled + env ids are still
the ids of the whole conversation rendered at once. That holds only for templates whose render of
a conversation is a prefix of the render of its continuation; `check_prefix_preserving` refuses,
at start, a template that is not (e.g. one that drops earlier turns' reasoning).
"""

from __future__ import annotations

from typing import Optional

# A dialogue every template can render: system, user, a tool call, its answer, the final turn.
SAMPLE_DIALOGUE = [
    {"role": "system", "content": "Use the tool."},
    {"role": "user", "content": "What is 37*41?"},
    {"role": "assistant", "content": "<calc>37*41</calc>"},
    {"role": "tool", "content": "1517"},
    {"role": "assistant", "content": "1517"},
]


class NotPrefixPreserving(ValueError):
    """The chat template re-renders earlier turns differently once a message is appended."""


class ChatTemplate:
    """A tokenizer's chat template as token ids: prompts, and the env ids that follow a turn.

    `tools`: JSON tool schemas for templates that render them (Qwen2.5's `<tool_call>` format);
    None for envs whose tool syntax is plain text in the prompt (the tiny model's `<calc>`)."""

    def __init__(self, tokenizer, name: str, tools: Optional[list[dict]] = None):
        self.tokenizer, self.name, self.tools = tokenizer, name, tools
        self.eos_id = tokenizer.eos_token_id

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """What the first turn is sampled from: the prompt with the assistant's generation prompt."""
        return self.render(messages, add_generation_prompt=True)

    def env_ids(self, conversation: list[dict], messages: list[dict], ended_on_eos: bool = True) -> list[int]:
        """Ids of the env's `messages` after `conversation` (which ends with the assistant turn just
        sampled), up to the next turn's generation prompt; `ended_on_eos` False: that turn stopped
        on a tool stop token, and the template's EOS that closes it is the env's first id."""
        before = self.render(conversation)
        after = self.render(conversation + messages, add_generation_prompt=True)
        eos = [i for i, t in enumerate(before) if t == self.eos_id]
        if not eos:
            raise NotPrefixPreserving(f"{self.name}: its chat template renders no EOS "
                                      f"(id {self.eos_id}) after an assistant turn")
        cut = eos[-1] + 1 if ended_on_eos else eos[-1]
        if after[:cut] != before[:cut]:
            raise NotPrefixPreserving(
                f"{self.name}: its chat template is not prefix-preserving (rendering a conversation with "
                f"{len(messages)} more message(s) changes the tokens of the turns before), so env tokens "
                "cannot be stitched after the sampled ones; multi-turn rollouts need a template that "
                "renders earlier turns the same way whatever follows")
        return after[cut:]

    def check_prefix_preserving(self, dialogue: list[dict] = SAMPLE_DIALOGUE) -> None:
        """At start: every assistant turn of `dialogue`, with the env messages after it stitched on,
        gives the ids of the dialogue rendered at once; NotPrefixPreserving naming the model if not."""
        ids = self.prompt_ids(dialogue[:2])
        for i in range(2, len(dialogue)):
            if dialogue[i]["role"] != "assistant":
                continue
            turn = self.tokenizer(dialogue[i]["content"], add_special_tokens=False).input_ids + [self.eos_id]
            ends = next((j for j in range(i + 1, len(dialogue)) if dialogue[j]["role"] == "assistant"), None)
            if ends is None:
                ids += turn
                break
            ids += turn + self.env_ids(dialogue[:i + 1], dialogue[i + 1:ends])
        whole = self.render(dialogue)
        whole = whole[:max(i for i, t in enumerate(whole) if t == self.eos_id) + 1]  # cut after the last EOS
        if ids != whole:
            raise NotPrefixPreserving(
                f"{self.name}: its chat template is not prefix-preserving: a sample dialogue stitched turn "
                "by turn differs from the same dialogue rendered at once; multi-turn rollouts need a "
                "template that renders earlier turns the same way whatever follows")
