"""`chat`: the cache reused across turns gives what re-reading the conversation gives."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxlocal.chat import ChatSession, repl
from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.generate import generate, load_model, render_chat

MESSAGES = ["Hello there", "What is the weather today?", "Translate it into French"]


def from_scratch(lm, session, max_tokens):
    """The last answer's tokens when the whole conversation before it is run anew."""
    before = session.messages[:-1]
    assert session.messages[-1]["role"] == "assistant"
    return generate(lm, render_chat(lm.tokenizer, before), max_tokens=max_tokens).tokens


def interrupt_layer(monkeypatch, lm, at_call: int):
    """Raise KeyboardInterrupt inside the model, as Ctrl-C would, on the last layer's
    `at_call`-th call: the layers before it have then taken the step, it has not."""
    layer = lm.model.layers[-1]
    original = type(layer).__call__
    calls = 0

    def call(self, *args, **kwargs):
        nonlocal calls
        if self is layer:
            calls += 1
            if calls == at_call:
                raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(layer), "__call__", call)


def test_cache_reuse_gives_the_tokens_of_a_fresh_run(tiny_lm):
    session = ChatSession(tiny_lm, system="Be brief.", max_tokens=16)
    previous_prompt = 0
    for message in MESSAGES:
        answer = session.send(message)
        text = "".join(answer)
        assert answer.result.text == text
        full = render_chat(tiny_lm.tokenizer, session.messages[:-1])
        # Only what the cache does not hold is fed: at least all of the previous prompt is
        # reused (a random model's answer re-tokenizes differently, so not always more).
        assert len(full) - len(answer.ids) >= previous_prompt
        previous_prompt = len(full)
        assert answer.result.tokens == from_scratch(tiny_lm, session, 16)
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * 3


def test_an_interrupted_answer_leaves_the_session_consistent(tiny_lm, monkeypatch):
    session = ChatSession(tiny_lm, max_tokens=16)
    "".join(session.send(MESSAGES[0]))
    with monkeypatch.context() as m:
        interrupt_layer(m, tiny_lm, at_call=6)  # prefill, first token, then 4 decode steps
        answer = session.send(MESSAGES[1])
        with pytest.raises(KeyboardInterrupt):
            for _ in answer:
                pass
        offsets = {c.offset for c in session._cache}
        assert len(offsets) == 2  # the layers disagree: the case being tested
    partial = answer.text
    last = session.send(MESSAGES[2])
    "".join(last)
    assert session.messages[3] == {"role": "assistant", "content": partial}
    assert last.result.tokens == from_scratch(tiny_lm, session, 16)


def test_abandoned_answer_system_change_and_reset(tiny_lm):
    session = ChatSession(tiny_lm, max_tokens=16)
    answer = session.send(MESSAGES[0])
    next(iter(answer))  # the reader walks away after one piece
    session.set_system("Answer in French.")
    second = session.send(MESSAGES[1])
    "".join(second)
    assert session.messages[0] == {"role": "system", "content": "Answer in French."}
    assert session.messages[2] == {"role": "assistant", "content": answer.text}
    assert second.result.tokens == from_scratch(tiny_lm, session, 16)
    session.reset()
    fresh = ChatSession(tiny_lm, system="Answer in French.", max_tokens=16)
    a, b = session.send(MESSAGES[2]), fresh.send(MESSAGES[2])
    assert "".join(a) == "".join(b) and a.result.tokens == b.result.tokens


def test_a_conversation_past_the_context_is_refused(tiny_lm):
    session = ChatSession(tiny_lm, max_tokens=8)
    with pytest.raises(MlxLocalError, match="context"):
        session.send("word " * 300)
    assert session.turns == []
    text = "".join(session.send(MESSAGES[0]))
    assert session.messages == [
        {"role": "user", "content": MESSAGES[0]},
        {"role": "assistant", "content": text},
    ]


def test_a_model_without_chat_template_is_refused(tiny_mlx):
    lm = load_model(tiny_mlx)  # its own copy: the tokenizer is changed below
    lm.tokenizer.has_chat_template = False
    with pytest.raises(MlxLocalError, match="chat template"):
        ChatSession(lm)


def test_cli_reads_one_message_a_line_when_not_a_terminal(tiny_lm, tmp_path):
    saved = tmp_path / "chat.json"
    lines = [MESSAGES[0], "", "/system Be brief.", MESSAGES[1], f"/save {saved}", "/quit", "no"]
    out = CliRunner().invoke(
        cli, ["chat", str(tiny_lm.path), "--max-tokens", "12"], input="\n".join(lines) + "\n"
    )
    assert out.exit_code == 0, out.output

    session = ChatSession(tiny_lm, max_tokens=12)
    first = "".join(session.send(MESSAGES[0]))
    session.set_system("Be brief.")
    second = "".join(session.send(MESSAGES[1]))
    assert out.stdout == f"{first}\n{second}\n"
    assert json.loads(saved.read_text())["messages"] == session.messages
    assert "(system prompt set)" in out.stderr and "saved to" in out.stderr


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_lm, monkeypatch):
    inputs = iter([KeyboardInterrupt, MESSAGES[0], MESSAGES[1], "/bogus"])

    def read():
        item = next(inputs, EOFError)
        if isinstance(item, type):
            raise item
        return item

    written, notes = [], []
    session = ChatSession(tiny_lm, max_tokens=16)
    interrupt_layer(monkeypatch, tiny_lm, at_call=4)  # inside the first answer only
    repl(session, read, written.append, notes.append)
    assert any("/quit" in n for n in notes)  # Ctrl-C at the prompt only explains how to leave
    assert "(stopped)" in notes
    assert any(n.startswith("unknown command /bogus") for n in notes)
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert "".join(written).endswith("\n" + session.messages[-1]["content"] + "\n")
    monkeypatch.undo()
    assert (
        generate(tiny_lm, render_chat(tiny_lm.tokenizer, session.messages[:-1]), max_tokens=16).text
        == session.messages[-1]["content"]
    )
