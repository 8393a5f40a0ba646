"""The prompt template: the one place that turns instructions and chat messages into model tokens.

One exchange (a "turn") is rendered as

    ### Instruction:
    {instruction}

    ### Context:
    {context}

    ### Response:
    {response}<|endoftext|>

The Context section appears only when there is context (a non-blank string). Text is used exactly
as given: no stripping, no escaping (a response may itself contain "### Response:"; training masks
tell the model where its answer starts, not a search for the header).

A conversation is its turns back to back, each earlier reply closed by <|endoftext|>, the next
"### Instruction:" right after it, and the turn to be answered ending with "### Response:\\n".
Every part is tokenized on its own (reply texts, rendered prompts) and joined by token id, so the
rendering of a history is exactly the first tokens of the rendering of any longer conversation.
That is what lets tuning and serving agree: data prep (data_prep/instruction_shards.py) trains each
reply after exactly the tokens the server (web/chat_request.py) and the terminal chat render for
the messages before it, and one sequence can train every reply of a conversation at once.

How OpenAI's chat messages map onto turns (chat_turns):
  - a "user" message opens a turn; consecutive user messages are one instruction, joined by a
    blank line;
  - "system" / "developer" messages are the Context of the turn they precede (or of the turn they
    sit in, before its reply), joined by blank lines; "tool" messages too, labelled "Tool: ";
  - an "assistant" message is the reply of the open turn; consecutive ones are joined by a blank
    line, and blank ones (a turn that only called a tool) are left out.
A single user message therefore renders exactly like an instruction record without context, and
one system message plus one user message like a record with context.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from model.tokenizer import EOT, encode

INSTRUCTION_HEADER = "### Instruction:\n"
CONTEXT_HEADER = "### Context:\n"
RESPONSE_HEADER = "### Response:\n"

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role is "developer"
CHAT_ROLES = (*SYSTEM_ROLES, "user", "assistant", "tool")
TOOL_LABEL = "Tool: "
MAX_TOKEN_BYTES = 128  # GPT-2's longest token: text of more than budget × this bytes cannot fit in budget tokens


def render_prompt(instruction: str, context: str | None = None) -> str:
    """The prompt for one instruction, ending with the response header ("### Response:\\n").

    >>> render_prompt("Name a colour.")
    '### Instruction:\\nName a colour.\\n\\n### Response:\\n'
    """
    prompt = INSTRUCTION_HEADER + instruction + "\n\n"
    if context is not None and context.strip():
        prompt += CONTEXT_HEADER + context + "\n\n"
    return prompt + RESPONSE_HEADER


class ChatError(ValueError):
    """Messages that cannot be rendered; `param` names the field (e.g. "messages[2].content")."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


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


@dataclass(frozen=True)
class Turn:
    """One exchange: an instruction, its context, and the reply (None: the one the model is to write).

    context holds (role, text) of the system, developer and tool messages of the turn, in order.
    weight is OpenAI fine-tuning's: 0 keeps a reply as history without training on it."""

    instruction: str
    context: tuple[tuple[str, str], ...] = ()
    reply: str | None = None
    weight: int = 1

    def text_bytes(self) -> int:
        """UTF-8 bytes of its texts: a lower bound of its tokens times MAX_TOKEN_BYTES, known without encoding."""
        return sum(len(t.encode()) for t in (self.instruction, self.context_text(), self.reply or ""))

    def context_text(self) -> str:
        return "\n\n".join(text if role in SYSTEM_ROLES else TOOL_LABEL + text for role, text in self.context)

    def prompt(self) -> str:
        return render_prompt(self.instruction, self.context_text())


def chat_turns(messages: list, *, weights: bool = False, field: str = "messages") -> list[Turn]:
    """The turns of an OpenAI-style list of messages, mapped as the module docstring says.

    With weights (fine-tuning data), an assistant message's "weight" (0 or 1; missing or null: 1) is
    read; the server leaves it alone. "name" and other keys are ignored. Raises ChatError naming the
    message and field at fault: not an object, unknown role, a user/system/tool message whose content
    is missing or null, non-text content, a bad weight, an empty reply to train on, an assistant
    message before any user message, a system or tool message after the last reply (served
    messages; tuning data just leaves it out), or no user message at all; field is the list's name in
    those messages. The last turn's reply is None when the messages end before one.

    >>> chat_turns([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    [Turn(instruction='Hi', context=(('system', 'Be brief.'),), reply=None, weight=1)]
    """
    turns: list[Turn] = []
    context: list[tuple[str, str]] = []
    users: list[str] = []
    reply: list[str] = []
    weight, trailing = 1, 0

    def close() -> None:
        turns.append(Turn("\n\n".join(users), tuple(context), "\n\n".join(reply) if reply else None, weight))
        context.clear()
        users.clear()
        reply.clear()

    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"{field}[{i}] must be an object with 'role' and 'content'", f"{field}[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ChatError(f"{field}[{i}].role is {role!r}: expected one of {', '.join(CHAT_ROLES)}", f"{field}[{i}].role")
        if role != "assistant" and m.get("content") is None:
            raise ChatError(f"{field}[{i}].content is required for a {role} message", f"{field}[{i}].content")
        try:
            text = message_text(m.get("content"))
        except ValueError as e:
            raise ChatError(f"{field}[{i}].content: {e}", f"{field}[{i}].content") from None
        if role == "assistant":
            w = m.get("weight") if weights else None
            w = 1 if w is None else w  # datasets fills a key missing from some rows with None
            if isinstance(w, bool) or w not in (0, 1):
                raise ChatError(f"{field}[{i}].weight is {w!r}: it must be 0 (not trained on) or 1", f"{field}[{i}].weight")
            if not text.strip():
                if weights and w and not m.get("tool_calls"):
                    raise ChatError(f"{field}[{i}] is an empty reply: give it text to train on, or weight 0",
                                    f"{field}[{i}].content")
                continue  # a turn that only called a tool: nothing to show or train
            if not users:
                raise ChatError(f"{field}[{i}] is an assistant message with no user message before it: each reply "
                                "answers a user message (a conversation starts with one, after any system messages)",
                                f"{field}[{i}]")
            if reply and w != weight:
                raise ChatError(f"{field}[{i}] continues the assistant's reply before it with another weight: "
                                "give consecutive assistant messages the same weight", f"{field}[{i}].weight")
            reply.append(text)
            weight = w
            continue
        if reply and role != "tool":  # the open turn has its reply: this message starts the next one
            close()  # (a tool's output belongs to the reply that called it)
        if role == "user":
            users.append(text)
        elif text.strip():
            context.append((role, text))
            trailing = i
    if users:
        close()
    elif not turns:
        raise ChatError(f"{field} need at least one message with role 'user'", field)
    elif context and not weights:  # tuning data: nothing after the last reply is trained, so it is left out
        raise ChatError(f"{field}[{trailing}] comes after the last reply: end with a user message for the model "
                        "to answer", f"{field}[{trailing}]")
    return turns


def turn_messages(turns: list[Turn]) -> list[dict]:
    """OpenAI chat messages that chat_turns maps back onto these turns: each turn's context messages,
    its user message, and its reply (if any) as an assistant message."""
    messages = []
    for turn in turns:
        messages += [{"role": role, "content": text} for role, text in turn.context]
        messages.append({"role": "user", "content": turn.instruction})
        if turn.reply is not None:
            messages.append({"role": "assistant", "content": turn.reply})
    return messages


# The same rendering as a Jinja chat template, for runtimes that render conversations themselves from
# the file they load: llama.cpp's server (--jinja), HF's apply_chat_template, vLLM. It maps messages
# onto turns as chat_turns does (and renders text equal to the turns' prompts and replies, tested),
# but validates nothing; <|endoftext|> is written as text, which those runtimes read as the special
# token. One difference they cannot avoid: they tokenize the whole text at once where we tokenize
# each prompt and reply on its own, which gives other tokens only where a reply starts with two or
# more spaces or tabs (GPT-2's pre-tokenizer then joins the prompt's last newline to them).
CHAT_TEMPLATE = (
    # text outside tags is literal (real newlines); '\\n' inside Jinja strings; no "-" next to a newline
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for part in content -%}{{ '\\n' if not loop.first }}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- macro turn(users, context, reply) -%}"
    "### Instruction:\n{{ users | join('\\n\\n') }}\n\n"
    "{% if context %}### Context:\n{{ context | join('\\n\\n') }}\n\n{% endif %}"
    "### Response:\n{% if reply %}{{ reply | join('\\n\\n') }}<|endoftext|>{% endif %}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(users=[], context=[], reply=[]) -%}"
    "{%- for m in messages -%}"
    "{%- set t = text(m['content']) -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- if t | trim %}{% set ns.reply = ns.reply + [t] %}{% endif -%}"
    "{%- else -%}"
    "{%- if ns.reply and m['role'] != 'tool' -%}"
    "{{ turn(ns.users, ns.context, ns.reply) }}{% set ns.users = [] %}{% set ns.context = [] %}{% set ns.reply = [] %}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' %}{% set ns.users = ns.users + [t] %}"
    "{%- elif t | trim %}{% set ns.context = ns.context + [('Tool: ' + t) if m['role'] == 'tool' else t] %}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.users %}{{ turn(ns.users, ns.context, ns.reply) }}{% endif -%}"
)


# The same rendering as an Ollama TEMPLATE (a Go text/template), for the Modelfile that
# model/export_gguf.py writes: Ollama does not render the GGUF's Jinja template, it renders its own.
# It sees Ollama's messages, in which consecutive messages of one role (tool messages aside) are
# already joined by a blank line, as chat_turns joins them; so it maps them onto turns as
# CHAT_TEMPLATE does (tested against our turns with Go's text/template). Every piece of output is a
# printf, so the template's own layout adds no whitespace. One difference: chat_turns leaves out a
# blank system, developer or assistant message, but Ollama joins it to a neighbour of its role with
# a blank line before the template runs (and Go templates cannot trim), so there the two differ.
OLLAMA_TEMPLATE = (
    '{{- $users := "" }}{{- $context := "" }}{{- $reply := "" }}{{- $open := false }}'
    '{{- range .Messages }}'
    '{{- if eq .Role "assistant" }}'
    '{{- if .Content }}{{ if $reply }}{{ $reply = printf "%s\\n\\n%s" $reply .Content }}{{ else }}{{ $reply = .Content }}{{ end }}{{ end }}'
    '{{- else }}'
    '{{- if and $reply (ne .Role "tool") }}'
    '{{- printf "### Instruction:\\n%s\\n\\n" $users }}'
    '{{- if $context }}{{ printf "### Context:\\n%s\\n\\n" $context }}{{ end }}'
    '{{- printf "### Response:\\n%s<|endoftext|>" $reply }}'
    '{{- $users = "" }}{{ $context = "" }}{{ $reply = "" }}{{ $open = false }}'
    '{{- end }}'
    '{{- if eq .Role "user" }}'
    '{{- if $open }}{{ $users = printf "%s\\n\\n%s" $users .Content }}{{ else }}{{ $users = .Content }}{{ $open = true }}{{ end }}'
    '{{- else if .Content }}'
    '{{- $text := .Content }}{{ if eq .Role "tool" }}{{ $text = printf "Tool: %s" .Content }}{{ end }}'
    '{{- if $context }}{{ $context = printf "%s\\n\\n%s" $context $text }}{{ else }}{{ $context = $text }}{{ end }}'
    '{{- end }}'
    '{{- end }}'
    '{{- end }}'
    '{{- if $open }}'
    '{{- printf "### Instruction:\\n%s\\n\\n" $users }}'
    '{{- if $context }}{{ printf "### Context:\\n%s\\n\\n" $context }}{{ end }}'
    '{{- printf "### Response:\\n" }}{{ if $reply }}{{ printf "%s<|endoftext|>" $reply }}{{ end }}'
    '{{- end }}'
)


CACHED_TEXT_CHARS = 4096  # longer texts are encoded each time: the cache stays a few MB whatever comes in


@functools.lru_cache(maxsize=1024)
def _encode_cached(text: str) -> tuple[int, ...]:
    return tuple(encode(text))


def _encode(text: str) -> list[int]:
    # a conversation's turns are rendered again for every reply (tuning) or every request (serving)
    return list(_encode_cached(text)) if len(text) <= CACHED_TEXT_CHARS else encode(text)


def turn_tokens(turn: Turn) -> tuple[list[int], list[int]]:
    """(prompt tokens, reply tokens) of one turn; the reply's end with <|endoftext|>, [] for no reply."""
    return _encode(turn.prompt()), [] if turn.reply is None else [*_encode(turn.reply), EOT]


def render_turns(turns: list[Turn]) -> tuple[list[int], list[int]]:
    """(tokens, weights) of turns back to back: weights are 0 on prompts and each reply's weight on
    that reply's tokens and its closing <|endoftext|>."""
    tokens: list[int] = []
    mask: list[int] = []
    for turn in turns:
        prompt, reply = turn_tokens(turn)
        tokens += prompt + reply
        mask += [0] * len(prompt) + [turn.weight] * len(reply)
    return tokens, mask


def check_awaiting(turns: list[Turn]) -> None:
    """ChatError unless the last turn awaits its reply (messages that end with the assistant's ask nothing)."""
    if turns[-1].reply is not None:
        raise ChatError("the last message is the assistant's: end with a user message for the model to answer")


def prompt_tokens(turns: list[Turn]) -> list[int]:
    """The tokens that ask for the last turn's reply: what the server and the terminal chat feed the
    model, and what tuning trained that reply after (check_awaiting's error if there is one already)."""
    check_awaiting(turns)
    return render_turns(turns)[0]


def fit_turns(turns: list[Turn], budget: int) -> tuple[list[Turn], int]:
    """The newest turns whose rendering takes at most `budget` tokens, and how many were dropped.

    The oldest turns go first, whole (an instruction with its reply); the system and developer
    messages of a dropped turn move to the first kept one, so the system prompt stays. The last
    turn is always kept, so the result may still exceed the budget, which the caller checks.
    Linear in the turns that are looked at: a turn whose text alone could not fit (more than
    MAX_TOKEN_BYTES bytes a token) is never tokenized, so a huge history costs no encoding.
    """

    def with_carried(start: int) -> Turn:
        carried = tuple(c for t in turns[:start] for c in t.context if c[0] in SYSTEM_ROLES)
        return replace(turns[start], context=carried + turns[start].context) if carried else turns[start]

    def length(turn: Turn) -> int:
        return sum(map(len, turn_tokens(turn)))

    # the oldest start that fits without the carried system messages, walking back from the newest turn
    start, rest_bytes, rest = len(turns) - 1, turns[-1].text_bytes(), length(turns[-1])
    while start > 0 and rest_bytes + turns[start - 1].text_bytes() <= budget * MAX_TOKEN_BYTES:
        more = length(turns[start - 1])
        if rest + more > budget:
            break
        start, rest_bytes, rest = start - 1, rest_bytes + turns[start - 1].text_bytes(), rest + more
    # carried system messages only add tokens: from there, drop more while the first kept turn overflows
    while start < len(turns) - 1 and length(with_carried(start)) - length(turns[start]) + rest > budget:
        rest -= length(turns[start])
        start += 1
    return [with_carried(start), *turns[start + 1 :]], start


def history_budget(context: int, max_tokens: int | None) -> int:
    """Tokens a served conversation may fill when its oldest turns are dropped to fit (fit_turns): the
    context less room for the answer, max_tokens but at most a quarter of the context, so that a
    large max_tokens does not leave out the whole history. The server (NANOGPT_DROP_OLD_TURNS) and
    the terminal chat both use it."""
    return context - min(max_tokens or context, context // 4)
