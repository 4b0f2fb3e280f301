"""`export ollama`: a folder with the GGUF and a Modelfile, ready for `ollama create NAME -f`.

Ollama's TEMPLATE is a Go template, not Jinja. We render the model's own chat template with
marker strings for the system prompt, the user's message and the reply, and put Ollama's
variables where the markers land: exact for the turn layout the chat template produces.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..checkpoint.atomic import atomic_directory, check_output
from ..data import apply_chat_template
from ..decoding import stop_tokens
from ..errors import MlxLocalError
from ..models import hf_tokenizer
from .gguf import GGUFExport, export_gguf

SYSTEM, PROMPT, RESPONSE = "@@SYSTEM_MARKER@@", "@@PROMPT_MARKER@@", "@@RESPONSE_MARKER@@"
GO_VARIABLES = {SYSTEM: "{{ .System }}", PROMPT: "{{ .Prompt }}"}


def export_ollama(
    model: str | Path,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    type: str = "auto",
    force: bool = False,
) -> GGUFExport:
    """Write OUT/model.gguf and OUT/Modelfile."""
    out = Path(out)
    check_output(out, force)
    with atomic_directory(out, force) as tmp:
        result = export_gguf(model, tmp / "model.gguf", adapter=adapter, type=type)
        (tmp / "Modelfile").write_text(modelfile(Path(model), "./model.gguf"))
    result.out = out / "model.gguf"
    return result


def modelfile(model: Path, gguf_path: str) -> str:
    """The Modelfile text: FROM, the chat template as a Go TEMPLATE, and stop tokens.

    The template and stop strings come from the checkpoint, so they are quoted such that
    Ollama's parser reads each back as exactly one value: none can add a directive.
    """
    tokenizer = hf_tokenizer(model)
    lines = [f"FROM {gguf_path}"]
    if tokenizer.chat_template:
        template = go_template(tokenizer)
        lines.append(f"TEMPLATE {modelfile_value(template, 'the chat template')}")
    stops = stop_tokens(tokenizer, model)  # the same that end an answer in `generate`
    lines += [f"PARAMETER stop {modelfile_value(s, 'the stop string')}" for s in stops]
    return "\n".join(lines) + "\n"


def modelfile_value(text: str, what: str) -> str:
    """`text` quoted so that Ollama's Modelfile parser reads it back whole, or an error.

    The format has no escapes: a value in quotes ends at the first line break where what came
    before is a whole quoted string (parser/parser.go), and characters that are not printable
    are dropped. So we try `text` in one pair of quotes (for one line), then in three, and
    keep the first that reads back as `text` with no earlier end.
    """
    bad = next((c for c in text if not (c.isprintable() or c in "\t\n\r")), None)
    if bad is not None:
        raise MlxLocalError(
            f"{what} holds the character U+{ord(bad):04X}, which an Ollama Modelfile cannot "
            "hold: write the Modelfile by hand"
        )
    candidates = [f'"""{text}"""']
    if "\n" not in text and "\r" not in text:
        candidates.insert(0, f'"{text}"')
    for quoted in candidates:
        breaks = [i for i, c in enumerate(quoted) if c in "\r\n"]
        if _unquote(quoted) == text and all(_unquote(quoted[:i].strip()) is None for i in breaks):
            return quoted
    raise MlxLocalError(
        f"{what} {text!r:.60} cannot be quoted in an Ollama Modelfile (it would end the "
        "value early): write the Modelfile by hand"
    )


def _unquote(value: str) -> str | None:
    """A value as Ollama's parser unquotes it; None while it is an unfinished quoted string."""
    if value.startswith('"""'):
        return value[3:-3] if len(value) >= 6 and value.endswith('"""') else None
    if value.startswith('"'):
        return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    return value


def _go_text(rendered: str) -> str:
    """Rendered chat-template text as Go template source: the markers become Ollama's variables,
    and in the literal text between them `{{` (and a `{` just before a variable) and every third
    quote in a row are written as actions, so the text neither starts an action nor closes the
    Modelfile's triple-quoted value."""
    parts = re.split(f"({SYSTEM}|{PROMPT})", rendered)
    return "".join(GO_VARIABLES.get(part) or _go_literal(part) for part in parts)


def _go_literal(text: str) -> str:
    escape = {"{{": '{{"{{"}}', "{": '{{"{"}}', '"': '{{"\\""}}'}
    return re.sub(r'\{\{|\{\Z|(?<="")"', lambda m: escape[m[0]], text)


def go_template(tokenizer) -> str:
    """Ollama's TEMPLATE from the Jinja chat template."""
    bos = tokenizer.bos_token

    def render(messages: list[dict], generation: bool) -> str:
        text = apply_chat_template(
            tokenizer, messages, tokenize=False, add_generation_prompt=generation
        )
        return text[len(bos) :] if bos and text.startswith(bos) else text  # Ollama adds BOS

    user = {"role": "user", "content": PROMPT}
    turn = render([user], True)
    reply = render([user, {"role": "assistant", "content": RESPONSE}], False)
    if PROMPT not in turn or RESPONSE not in reply:
        raise MlxLocalError("the chat template drops messages; write the Modelfile by hand")
    end_of_turn = reply.split(RESPONSE, 1)[1]
    template = _go_text(turn) + "{{ .Response }}" + _go_text(end_of_turn)
    try:
        with_system = render([{"role": "system", "content": SYSTEM}, user], True)
    except MlxLocalError:  # templates that raise on a system role (Jinja's raise_exception)
        return template
    # The system block sits between what both renderings share at the start and at the end.
    head = os.path.commonprefix([with_system, turn])
    if SYSTEM in with_system and with_system.endswith(turn[len(head) :]):
        block = with_system[len(head) : len(with_system) - len(turn) + len(head)]
        template = (
            _go_text(head)
            + "{{ if .System }}"
            + _go_text(block)
            + "{{ end }}"
            + _go_text(turn[len(head) :])
            + "{{ .Response }}"
            + _go_text(end_of_turn)
        )
    return template
