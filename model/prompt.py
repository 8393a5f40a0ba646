"""The prompt template: the one place that turns instructions and chat messages into model text.

Data prep renders every training example with `render_prompt` + the response + <|endoftext|>;
fine-tuning samples, evaluation and the server render their prompts with the same functions, so a
model is always asked in exactly the shape it was tuned on:

    ### Instruction:
    {instruction}

    ### Context:
    {context}

    ### Response:
    {response}<|endoftext|>

The Context section appears only when there is context (a non-blank string). Text is used exactly
as given: no stripping, no escaping (a response may itself contain "### Response:"; training masks
tell the model where its answer starts, not a search for the header).
"""

from __future__ import annotations

INSTRUCTION_HEADER = "### Instruction:\n"
CONTEXT_HEADER = "### Context:\n"
RESPONSE_HEADER = "### Response:\n"

# chat roles and how the earlier turns of a conversation are labelled inside the Context section
SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role is "developer"
TRANSCRIPT_LABELS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}
CHAT_ROLES = SYSTEM_ROLES + tuple(TRANSCRIPT_LABELS)


def render_prompt(instruction: str, context: str | None = None) -> str:
    """The prompt for one instruction, ending with the response header ("### Response:\\n").

    >>> render_prompt("Name a colour.")
    '### Instruction:\\nName a colour.\\n\\n### Response:\\n'
    """
    prompt = INSTRUCTION_HEADER + instruction + "\n\n"
    if context is not None and context.strip():
        prompt += CONTEXT_HEADER + context + "\n\n"
    return prompt + RESPONSE_HEADER


def message_text(content: str | list | None) -> str:
    """The text of a chat message's `content`: a string, None (an assistant turn with no text), or
    OpenAI's list of parts, of which only {"type": "text", "text": str} is accepted (joined with
    newlines). Anything else raises ValueError, whose message says what was wrong."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"content must be a string or a list of text parts, not {type(content).__name__}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content part {i} is {kind!r}: this model reads text parts only")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {i} has no string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


def render_messages(messages: list[dict]) -> str:
    """The prompt for an OpenAI-style chat: a list of {"role", "content"} dicts.

    The model was tuned on single instructions, so a conversation is folded into one:
      - Instruction: the last "user" message.
      - Context: first the "system"/"developer" texts (joined by blank lines), then every other
        user, assistant and tool message in order, one per paragraph, as "User: ...",
        "Assistant: ..." and "Tool: ...". Messages with blank text (an assistant turn that only
        called a tool) are left out.
    A single user message therefore renders exactly like a training example without context,
    and one system message plus one user message like one with context. Raises ValueError for
    an unknown role, bad content or no user message.

    >>> render_messages([{"role": "system", "content": "Be brief."},
    ...                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
    ...                  {"role": "user", "content": "Name a colour."}])
    '### Instruction:\\nName a colour.\\n\\n### Context:\\nBe brief.\\n\\nUser: Hi\\n\\nAssistant: Hello!\\n\\n### Response:\\n'
    """
    roles = [m.get("role") for m in messages]
    for i, role in enumerate(roles):
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}: expected one of {', '.join(CHAT_ROLES)}")
    if "user" not in roles:
        raise ValueError("messages need at least one message with role 'user'")
    last_user = len(roles) - 1 - roles[::-1].index("user")
    texts = [message_text(m.get("content")) for m in messages]
    system = [text for role, text in zip(roles, texts) if role in SYSTEM_ROLES and text.strip()]
    transcript = [
        f"{TRANSCRIPT_LABELS[role]}: {text}"
        for i, (role, text) in enumerate(zip(roles, texts))
        if role in TRANSCRIPT_LABELS and i != last_user and text.strip()
    ]
    return render_prompt(texts[last_user], "\n\n".join(system + transcript))
