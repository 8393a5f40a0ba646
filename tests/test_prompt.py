"""model/prompt.py: the exact prompt template, and how OpenAI-style chats become turns and tokens."""

import doctest

import pytest

import model.prompt
from model.prompt import (ChatError, Turn, chat_turns, fit_turns, history_budget, message_text, prompt_tokens,
                          render_prompt, render_turns)
from model.tokenizer import EOT, decode, encode


def rendered(messages) -> str:
    """The text of the prompt the server sends for messages (EOT shows as "<|endoftext|>")."""
    return decode(prompt_tokens(chat_turns(messages)))


def test_prompt_without_context_is_the_exact_template():
    assert render_prompt("Name a colour.") == "### Instruction:\nName a colour.\n\n### Response:\n"


def test_prompt_with_context_is_the_exact_template():
    assert render_prompt("Summarize.", "Some text.") == (
        "### Instruction:\nSummarize.\n\n### Context:\nSome text.\n\n### Response:\n"
    )


@pytest.mark.parametrize("context", [None, "", "   ", "\n\t\n"])
def test_blank_context_leaves_out_the_context_section(context):
    assert render_prompt("Do it.", context) == "### Instruction:\nDo it.\n\n### Response:\n"


def test_text_is_used_exactly_as_given():
    # no stripping or escaping: surrounding whitespace, headers and special-token text are kept verbatim
    instruction = "  ### Response:\n<|endoftext|> é 中文 😀 e\u0301 "
    context = "\n ctx ### Instruction:\n"
    assert render_prompt(instruction, context) == (
        f"### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"
    )


def test_single_user_message_renders_like_a_training_example_without_context():
    assert rendered([{"role": "user", "content": "Name a colour."}]) == render_prompt("Name a colour.")
    assert prompt_tokens(chat_turns([{"role": "user", "content": "Name a colour."}])) == encode(render_prompt("Name a colour."))


@pytest.mark.parametrize("system_role", ["system", "developer"])
def test_system_and_user_render_like_a_training_example_with_context(system_role):
    messages = [{"role": system_role, "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert rendered(messages) == render_prompt("Name a colour.", "Be brief.")


def test_multi_turn_chat_is_its_turns_back_to_back_each_reply_closed_by_eot():
    messages = [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "system", "content": "more sys"},  # the context of the turn it precedes
        {"role": "user", "content": "And 3+3?"},
    ]
    first, second = render_prompt("What is 2+2?", "sys"), render_prompt("And 3+3?", "more sys")
    assert rendered(messages) == first + "4<|endoftext|>" + second
    # by token id, each part on its own: the EOT is the special token, not the text
    assert prompt_tokens(chat_turns(messages)) == encode(first) + encode("4") + [EOT] + encode(second)


def test_the_rendering_of_a_history_is_the_start_of_every_longer_one():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a b"},
                {"role": "assistant", "content": " x\n"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "y"}, {"role": "user", "content": "d"}]
    full, _ = render_turns(chat_turns(messages))
    for end in (2, 4, 6):
        history = prompt_tokens(chat_turns(messages[:end]))
        assert full[: len(history)] == history


def test_consecutive_user_and_assistant_messages_join_and_a_trailing_system_message_is_context():
    messages = [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "reply"},
        {"role": "assistant", "content": "more"},
        {"role": "user", "content": "third"},
        {"role": "system", "content": "late"},
    ]
    turns = chat_turns(messages)
    assert turns == [Turn("first\n\nsecond", (), "reply\n\nmore"), Turn("third", (("system", "late"),))]


def test_tool_messages_are_labelled_context_and_empty_assistant_turns_left_out():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},  # only called a tool
        {"role": "tool", "content": "sunny, 21C"},
        {"role": "assistant", "content": "   "},  # blank text is left out too
        {"role": "user", "content": "So?"},
    ]
    assert rendered(messages[:3]) == render_prompt("Weather in Paris?", "Tool: sunny, 21C")
    # the tool result belongs to the open turn, which the next user message continues
    assert chat_turns(messages) == [Turn("Weather in Paris?\n\nSo?", (("tool", "sunny, 21C"),))]


def test_content_as_a_list_of_text_parts_is_joined_with_newlines():
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    assert message_text(parts) == "line one\nline two"
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": parts},
    ]
    assert rendered(messages) == render_prompt("line one\nline two", "a\nb")


def test_message_text_of_none_and_strings():
    assert message_text(None) == ""
    assert message_text("  as is \n") == "  as is \n"
    assert message_text([]) == ""


@pytest.mark.parametrize(
    "messages, match, param",
    [
        ([{"role": "bot", "content": "hi"}, {"role": "user", "content": "x"}], r"messages\[0\]\.role is 'bot'",
         "messages[0].role"),
        ([{"content": "no role"}], r"messages\[0\]\.role is None", "messages[0].role"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
         "the last message is the assistant's", "messages"),
        ([{"role": "system", "content": "s"}], "at least one message with role 'user'", "messages"),
        ([{"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "x"}],
         r"messages\[0\] is an assistant message with no user message before it", "messages[0]"),
        ([{"role": "user"}], r"messages\[0\]\.content is required for a user message", "messages[0].content"),
        ([{"role": "system", "content": None}, {"role": "user", "content": "x"}],
         r"messages\[0\]\.content is required for a system message", "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": "see"},
                                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
         "content part 1 is 'image_url'", "messages[0].content"),
        ([{"role": "user", "content": 5}], "content must be a string or a list of text parts, not int", "messages[0].content"),
        ([{"role": "user", "content": {"text": "x"}}], "not dict", "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "content part 0 has no string 'text'",
         "messages[0].content"),
        ([{"role": "user", "content": ["bare string part"]}], "content part 0 is 'str'", "messages[0].content"),
        # a bad earlier turn is an error too, not silently dropped
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": 1.5}, {"role": "user", "content": "y"}],
         "not float", "messages[1].content"),
        (["not an object"], r"messages\[0\] must be an object", "messages[0]"),
    ],
)
def test_bad_chats_raise_chat_error_naming_the_field(messages, match, param):
    with pytest.raises(ChatError, match=match) as e:
        prompt_tokens(chat_turns(messages))
    assert e.value.param == param


def test_weights_are_read_only_for_tuning_data():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                {"role": "user", "content": "r"}, {"role": "assistant", "content": "b", "name": "bot"}]
    assert [t.weight for t in chat_turns(messages, weights=True)] == [0, 1]
    assert [t.weight for t in chat_turns(messages)] == [1, 1]  # the server ignores the field
    tokens, weights = render_turns(chat_turns(messages, weights=True))
    trained = [t for t, w in zip(tokens, weights) if w]
    assert trained == encode("b") + [EOT]
    for bad, match in [(2, "weight is 2"), (True, "weight is True"), ("1", "weight is '1'")]:
        with pytest.raises(ChatError, match=match):
            chat_turns([messages[0], messages[1] | {"weight": bad}], weights=True)
    with pytest.raises(ChatError, match="is an empty reply"):
        chat_turns([messages[0], {"role": "assistant", "content": " "}], weights=True)


def turn(i: int, words: int = 5) -> Turn:
    return Turn(f"question {i} " + "w " * words, (), f"answer {i}")


def test_fit_turns_drops_the_oldest_whole_turns_and_keeps_the_system_prompt():
    turns = [Turn("q0", (("system", "Be brief."), ("tool", "old result")), "a0"), turn(1), turn(2),
             Turn("last", (), None)]
    assert fit_turns(turns, 10_000) == (turns, 0)
    full = len(render_turns(turns)[0])
    kept, dropped = fit_turns(turns, full - 1)
    assert dropped == 1 and kept[1:] == turns[2:]
    # the system message moved to the first kept turn; the dropped turn's tool output went with it
    assert kept[0] == Turn(turns[1].instruction, (("system", "Be brief."),), turns[1].reply)
    assert len(render_turns(kept)[0]) <= full - 1
    kept, dropped = fit_turns(turns, 1)  # nothing fits: the last turn stays, for the caller to refuse
    assert dropped == 3 and kept == [Turn("last", (("system", "Be brief."),), None)]


def test_fit_turns_never_encodes_turns_that_cannot_fit_by_their_bytes(monkeypatch):
    huge = Turn("x" * 1_000_000, (), "y")
    seen = []
    monkeypatch.setattr(model.prompt, "encode", lambda text: seen.append(len(text)) or encode(text))
    model.prompt._encode_cached.cache_clear()
    kept, dropped = fit_turns([huge, turn(1), Turn("q", (), None)], 100)
    assert dropped == 1 and max(seen) < 1000


def test_fit_turns_encodes_each_turn_once_whatever_the_length_of_the_chat(monkeypatch):
    turns = [Turn(f"q{i}", (("system", "S"),) if i == 0 else (), f"a{i}") for i in range(3000)] + [Turn("last")]
    calls = []
    monkeypatch.setattr(model.prompt, "encode", lambda text: calls.append(text) or encode(text))
    model.prompt._encode_cached.cache_clear()
    kept, dropped = fit_turns(turns, 10**6)  # all of it fits
    assert dropped == 0 and kept == turns and len(calls) <= 2 * len(turns)
    calls.clear()
    kept, dropped = fit_turns(turns, 40)  # only the newest few fit: the rest is never looked at
    assert dropped > 2990 and len(calls) < 20 and kept[0].context == (("system", "S"),)


def test_tool_output_belongs_to_the_reply_that_called_it():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    assert chat_turns(messages) == [Turn("Weather in Paris?", (("tool", "sunny"),), "Let me check.\n\nSunny."),
                                    Turn("Thanks")]
    # in tuning data a tool call without text is skipped, not an empty reply
    calling = [messages[0], {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, messages[2], messages[3]]
    assert chat_turns(calling, weights=True) == [Turn("Weather in Paris?", (("tool", "sunny"),), "Sunny.")]


def test_a_system_message_after_the_last_reply():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}]
    with pytest.raises(ChatError, match=r"messages\[2\] comes after the last reply") as e:
        chat_turns(messages)
    assert e.value.param == "messages[2]"
    assert chat_turns(messages, weights=True) == [Turn("q", (), "a")]  # tuning data: nothing to train after it


def test_a_null_weight_is_the_default():
    messages = [{"role": "user", "content": "q", "weight": None}, {"role": "assistant", "content": "a", "weight": None}]
    assert chat_turns(messages, weights=True) == [Turn("q", (), "a", 1)]


def test_history_budget_leaves_room_for_the_answer_but_never_more_than_a_quarter():
    assert history_budget(1024, 100) == 924
    assert history_budget(1024, 2000) == history_budget(1024, None) == 768


def test_docstring_examples_hold():
    result = doctest.testmod(model.prompt)
    assert result.attempted >= 2
    assert result.failed == 0


# every mapping rule of chat_turns once: system before and inside a turn, developer, consecutive user and
# assistant messages, text parts, a tool call with empty content and its labelled output, blank system
# text, unicode, a reply holding the template's header, a conversation ending with a reply
TEMPLATE_CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 5?"},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "And 3 plus 3?"}],
    [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Café?"},
     {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
     {"role": "system", "content": "   "}, {"role": "system", "content": "Mind the accents: e\u0301 😀"},
     {"role": "assistant", "content": "Oui."}, {"role": "assistant", "content": "### Response:\nstill me"},
     {"role": "user", "content": "Merci"}],
    [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
     {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
     {"role": "system", "content": "Now be terse."}, {"role": "user", "content": " spaced \n"},
     {"role": "assistant", "content": "Ok"}],
]


@pytest.mark.parametrize("lstrip_and_trim", [False, True], ids=["plain-jinja", "hf-jinja"])
@pytest.mark.parametrize("messages", TEMPLATE_CHATS, ids=range(len(TEMPLATE_CHATS)))
def test_the_chat_template_renders_exactly_our_turns(messages, lstrip_and_trim):
    """CHAT_TEMPLATE (in GGUF and HF exports) gives the text of our rendering, and tokenized as llama.cpp
    and HF do (whole, <|endoftext|> as the special token) the very tokens the server sends."""
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=lstrip_and_trim, lstrip_blocks=lstrip_and_trim)
    text = env.from_string(model.prompt.CHAT_TEMPLATE).render(messages=messages)
    turns = chat_turns(messages, weights=True)
    assert text == "".join(t.prompt() + ("" if t.reply is None else t.reply + "<|endoftext|>") for t in turns)
    tokens: list[int] = []
    for i, part in enumerate(text.split("<|endoftext|>")):
        tokens += ([EOT] if i else []) + encode(part)
    assert tokens == render_turns(turns)[0]
