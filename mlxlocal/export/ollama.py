"""`export ollama`: a folder with the GGUF and a Modelfile, ready for `ollama create NAME -f`.

Ollama's TEMPLATE is a Go template, not Jinja. We render the model's own chat template with
marker strings for the system prompt, the user's message and the reply, and put Ollama's
variables where the markers land: exact for the turn layout the chat template produces.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint.atomic import atomic_directory, check_output
from ..decoding import stop_tokens
from ..errors import MlxLocalError
from ..models import hf_tokenizer
from .gguf import GGUFExport, export_gguf

SYSTEM, PROMPT, RESPONSE = "@@SYSTEM_MARKER@@", "@@PROMPT_MARKER@@", "@@RESPONSE_MARKER@@"


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
    """The Modelfile text: FROM, the chat template as a Go TEMPLATE, and stop tokens (the same
    that end an answer in `generate`: EOS and the template's end of turn)."""
    tokenizer = hf_tokenizer(model)
    lines = [f"FROM {gguf_path}"]
    if tokenizer.chat_template:
        template = go_template(tokenizer)
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stop_tokens(tokenizer, model)]
    return "\n".join(lines) + "\n"


def go_template(tokenizer) -> str:
    """Ollama's TEMPLATE from the Jinja chat template."""

    def render(messages: list[dict], generation: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )

    user = {"role": "user", "content": PROMPT}
    turn = render([user], True)
    reply = render([user, {"role": "assistant", "content": RESPONSE}], False)
    if PROMPT not in turn or RESPONSE not in reply:
        raise MlxLocalError("the chat template drops messages; write the Modelfile by hand")
    end_of_turn = reply.split(RESPONSE, 1)[1]
    template = turn.replace(PROMPT, "{{ .Prompt }}") + "{{ .Response }}" + end_of_turn
    try:
        with_system = render([{"role": "system", "content": SYSTEM}, user], True)
    except Exception:  # templates that raise on a system role (Jinja's raise_exception)
        return template
    # The system block sits between what both renderings share at the start and at the end.
    head = os.path.commonprefix([with_system, turn])
    if SYSTEM in with_system and with_system.endswith(turn[len(head) :]):
        block = with_system[len(head) : len(with_system) - len(turn) + len(head)]
        system = "{{ if .System }}" + block.replace(SYSTEM, "{{ .System }}") + "{{ end }}"
        template = head + system + template[len(head) :]
    bos = tokenizer.bos_token
    if bos and template.startswith(bos):  # llama.cpp and Ollama add BOS themselves
        template = template[len(bos) :]
    return template
