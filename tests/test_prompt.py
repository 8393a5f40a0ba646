"""model/prompt.py: the exact prompt template, and how OpenAI-style chats fold into it."""

import doctest

import pytest

import model.prompt
from model.prompt import message_text, render_messages, render_prompt


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
    assert render_messages([{"role": "user", "content": "Name a colour."}]) == render_prompt("Name a colour.")


@pytest.mark.parametrize("system_role", ["system", "developer"])
def test_system_and_user_render_like_a_training_example_with_context(system_role):
    messages = [{"role": system_role, "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert render_messages(messages) == render_prompt("Name a colour.", "Be brief.")


def test_multi_turn_chat_folds_earlier_turns_into_the_context():
    messages = [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "system", "content": "more sys"},  # system texts come first, whatever their position
        {"role": "user", "content": "And 3+3?"},
    ]
    assert render_messages(messages) == render_prompt(
        "And 3+3?", "sys\n\nmore sys\n\nUser: What is 2+2?\n\nAssistant: 4"
    )


def test_instruction_is_the_last_user_message_even_when_turns_follow_it():
    messages = [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "reply"},
    ]
    assert render_messages(messages) == render_prompt("second", "User: first\n\nAssistant: reply")


def test_tool_messages_are_labelled_and_empty_assistant_turns_left_out():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},  # only called a tool
        {"role": "tool", "content": "sunny, 21C"},
        {"role": "assistant", "content": "   "},  # blank text is left out too
        {"role": "user", "content": "So?"},
    ]
    assert render_messages(messages) == render_prompt(
        "So?", "User: Weather in Paris?\n\nTool: sunny, 21C"
    )


def test_content_as_a_list_of_text_parts_is_joined_with_newlines():
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    assert message_text(parts) == "line one\nline two"
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": parts},
    ]
    assert render_messages(messages) == render_prompt("line one\nline two", "a\nb")


def test_message_text_of_none_and_strings():
    assert message_text(None) == ""
    assert message_text("  as is \n") == "  as is \n"
    assert message_text([]) == ""


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "bot", "content": "hi"}, {"role": "user", "content": "x"}], r"messages\[0\]\.role is 'bot'"),
        ([{"content": "no role"}], r"messages\[0\]\.role is None"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
         "at least one message with role 'user'"),
        ([], "at least one message with role 'user'"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "see"},
                                          {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
            "content part 1 is 'image_url'",
        ),
        ([{"role": "user", "content": 5}], "content must be a string or a list of text parts, not int"),
        ([{"role": "user", "content": {"text": "x"}}], "not dict"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "content part 0 has no string 'text'"),
        ([{"role": "user", "content": ["bare string part"]}], "content part 0 is 'str'"),
        # a bad earlier turn is an error too, not silently dropped
        ([{"role": "assistant", "content": 1.5}, {"role": "user", "content": "x"}], "not float"),
    ],
)
def test_bad_chats_raise_value_error_saying_what_is_wrong(messages, match):
    with pytest.raises(ValueError, match=match):
        render_messages(messages)


def test_docstring_examples_hold():
    result = doctest.testmod(model.prompt)
    assert result.attempted >= 2
    assert result.failed == 0
