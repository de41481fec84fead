"""Prefix reuse that follows the conversation, with templates that behave like the real ones.

At every later turn of a conversation the prompt reuses, from the engine's prefix cache,
within 8 tokens of the longest prefix it shares with anything processed before (earlier
prompts and the replies generated after them): with the Instruct template that is the
whole previous conversation; with the Thinking template, which re-renders earlier replies
without their reasoning, the previous turn's assistant header.
"""

from __future__ import annotations

import pytest
from chat_helpers import (
    ASSISTANT_HEADER,
    INSTRUCT_TEMPLATE,
    THINKING_TEMPLATE,
    ScriptedModel,
    chat_model_folder,
    folder_with_template,
    last_user_text,
)

import qnext_mlx
from qnext_mlx.serve.chat_session import ChatEngine, ReplyStats, SamplingSettings

pytest.importorskip("torch")


def responder(thinking: bool):
    def reply(prompt_text: str) -> str:
        answer = f"You asked about {last_user_text(prompt_text)[:30]}; here is a short answer."
        if thinking:  # the prompt opened <think>: the reply carries on inside it
            return f"<think>\nThe question is {len(prompt_text)} characters long.\n</think>\n\n{answer}"
        return answer

    return reply


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.mark.parametrize("template", ["instruct", "thinking"])
def test_every_later_turn_reuses_the_longest_reusable_prefix(hf_checkpoint, tmp_path, template):
    thinking = template == "thinking"
    folder = folder_with_template(chat_model_folder(hf_checkpoint), tmp_path / template,
                                  THINKING_TEMPLATE if thinking else INSTRUCT_TEMPLATE)  # fmt: skip
    model, tokenizer = qnext_mlx.load(folder)
    scripted = ScriptedModel(model, tokenizer, responder(thinking))
    engine = ChatEngine(scripted, tokenizer, max_context=8192, prefill_step_size=32)
    header = list(tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False))
    messages = [{"role": "system", "content": "You are a careful assistant who answers in one sentence."}]
    processed = []  # every token sequence the model has seen: prompt + the reply generated after it
    questions = ["Why is the sky blue?", "And the sea?", "What about sunsets, then?", "Thanks. One more: clouds?"]
    for turn, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        prompt = engine.prepare(messages)
        if thinking:
            assert tokenizer.decode(prompt.ids).endswith("<|im_start|>assistant\n<think>\n")
        items = list(engine.generate(prompt, SamplingSettings(temp=0.0, max_tokens=200)))
        stats = items[-1]
        assert isinstance(stats, ReplyStats) and stats.finish_reason == "stop"
        content = "".join(d.text for d in items[:-1] if d.kind == "content")
        reasoning = "".join(d.text for d in items[:-1] if d.kind == "reasoning")
        assert content.startswith("You asked about") and bool(reasoning) == thinking
        longest = max([common_prefix(prompt.ids, seq) for seq in processed] + [0])
        longest = min(longest, len(prompt.ids) - 1)  # the last prompt token always runs
        if turn:
            assert stats.cached_tokens <= longest and longest - stats.cached_tokens <= 8, (turn, stats, longest)
            # what is reusable is most of the prompt: only the new turn is prefilled
            assert len(prompt.ids) - stats.cached_tokens < 60
        header_end = max(i + len(header) for i in range(len(prompt.ids)) if prompt.ids[i : i + len(header)] == header)
        reply = scripted.reply_tokens(prompt.ids)
        processed.append(prompt.ids + reply[len(prompt.ids) - header_end :])
        messages.append(
            {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if thinking else {})}
        )
    if thinking:  # earlier replies come back without their reasoning
        assert "The question is" not in tokenizer.decode(engine.prepare(messages[:-1]).ids[:-40])


def test_two_conversations_with_one_system_prompt_share_it(hf_checkpoint, tmp_path):
    folder = folder_with_template(chat_model_folder(hf_checkpoint), tmp_path / "instruct", INSTRUCT_TEMPLATE)
    model, tokenizer = qnext_mlx.load(folder)
    engine = ChatEngine(ScriptedModel(model, tokenizer, responder(False)), tokenizer, max_context=8192)
    system = {"role": "system", "content": "You are a careful assistant who answers in one sentence. " * 3}
    settings = SamplingSettings(temp=0.0, max_tokens=100)
    first_prompt = engine.prepare([system, {"role": "user", "content": "one"}])
    first = list(engine.generate(first_prompt, settings))[-1]
    second_prompt = engine.prepare([system, {"role": "user", "content": "two, a different question"}])
    second = list(engine.generate(second_prompt, settings))[-1]
    assert first.cached_tokens == 0
    system_turn = tokenizer.encode(f"<|im_start|>system\n{system['content']}<|im_end|>\n", add_special_tokens=False)
    shared = common_prefix(first_prompt.ids, second_prompt.ids)  # the system turn and the user header
    assert shared > len(system_turn) and second.cached_tokens == shared
