"""`serve`'s `response_format`: answers in the shape asked for, through the official `openai`
client on a live loopback server.

References: the `jsonschema` package for every answer; `generate` with the same constraint on the
same greedy input (and `mlxlocal generate --json-schema`) for the exact text; each request alone
for a mix of constrained and free streams running in one batch.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
from click.testing import CliRunner
from serving import LiveServer, http
from serving import loopback_only as no_network  # noqa: F401 - replaces conftest's fixture
from test_constraints import SCHEMA

from mlxlocal.cli import cli
from mlxlocal.generate import generate
from mlxlocal.serve import create_app

TEXTS = ["classify: buy now", "the lazy dog", "your local model keeps data", "a fox"]


def schema_format(schema: dict = SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema,
                                                   "strict": True}}  # fmt: skip


@pytest.fixture(scope="module")
def live(tiny_lm):
    app = create_app(tiny_lm, max_concurrency=16, prefix_cache=64 * 2**20)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live, tiny_mlx):
    c = live.client()
    c.base_model = tiny_mlx.name
    return c


def chat(client, text, **options):
    return client.chat.completions.create(
        model=client.base_model, messages=[{"role": "user", "content": text}],
        **{"temperature": 0, **options},
    )  # fmt: skip


def test_json_schema_answers_validate_and_equal_generate(client, tiny_lm):
    for text in TEXTS:
        ref = generate(tiny_lm, text, max_tokens=120, json_schema=SCHEMA)
        assert ref.finish_reason == "stop" and ref.valid, ref.text
        r = chat(client, text, max_tokens=120, response_format=schema_format())
        content = r.choices[0].message.content
        jsonschema.validate(json.loads(content), SCHEMA)
        assert content == ref.text
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == ref.generation_tokens
        stream = chat(client, text, max_tokens=120, response_format=schema_format(), stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampled_answers_validate_too(client):
    for seed in range(6):
        r = chat(client, f"answer {seed}", max_tokens=160, response_format=schema_format(),
                 temperature=1.0, seed=seed)  # fmt: skip
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_object_and_text(client, tiny_lm):
    whole = 0
    for text in TEXTS:
        ref = generate(tiny_lm, text, max_tokens=60, json_object=True)
        r = chat(client, text, max_tokens=60, response_format={"type": "json_object"})
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason
        if ref.finish_reason == "stop":  # a random model may write one long string instead
            assert isinstance(json.loads(ref.text), dict)
            whole += 1
    assert whole >= 1
    for text in TEXTS[:2]:
        free = generate(tiny_lm, text, max_tokens=12).text
        r = chat(client, text, max_tokens=12, response_format={"type": "text"})
        assert r.choices[0].message.content == free


def test_plain_completions_take_a_response_format(client, tiny_lm):
    text = "the quick brown fox"
    ref = generate(tiny_lm, text, max_tokens=120, json_schema=SCHEMA, chat_template=False)
    r = client.completions.create(
        model=client.base_model, prompt=text, max_tokens=120, temperature=0,
        extra_body={"response_format": schema_format()},
    )  # fmt: skip
    assert r.choices[0].text == ref.text
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_cli_generate_json_schema_equals_the_server(client, tiny_mlx, tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    result = CliRunner().invoke(
        cli,
        ["generate", str(tiny_mlx), "-p", "classify: buy now", "--max-tokens", "120",
         "--json-schema", str(tmp_path / "schema.json"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout.strip().splitlines()[-1])["text"]
    r = chat(client, "classify: buy now", max_tokens=120, response_format=schema_format())
    assert r.choices[0].message.content == expected


def test_max_tokens_cut_is_length(client, tiny_lm):
    ref = generate(tiny_lm, "the lazy dog", max_tokens=4, json_schema=SCHEMA)
    assert (ref.finish_reason, ref.valid) == ("length", False)
    r = chat(client, "the lazy dog", max_tokens=4, response_format=schema_format())
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == 4


class Verdict(pydantic.BaseModel):
    label: Literal["spam", "ham"]
    score: int
    reason: str = pydantic.Field(max_length=12)


def test_openai_parse_with_a_pydantic_model(client, tiny_lm):
    """The client's own schema for a pydantic model (strict: every field required, no extras)."""
    from openai.lib._pydantic import to_strict_json_schema

    schema = to_strict_json_schema(Verdict)
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for text in TEXTS[:2]:
        ref = generate(tiny_lm, text, max_tokens=120, json_schema=schema)
        r = parse(
            model=client.base_model,
            messages=[{"role": "user", "content": text}],
            temperature=0,
            max_tokens=120,
            response_format=Verdict,
        )
        message = r.choices[0].message
        assert message.content == ref.text
        assert message.parsed == Verdict.model_validate_json(ref.text)


def test_constrained_and_free_streams_together_equal_each_alone(live, client, tiny_lm):
    """One batch mixes sequences with a mask (each its own matcher) and without one; only the
    constrained ones carry a logits processor (any processor sends the batch down its
    per-sequence path, so a batch of free requests must have none)."""
    formats = [schema_format(), None, {"type": "json_object"}, None]
    jobs = [(t, formats[i % 4], 8 + 5 * (i % 3)) for i, t in enumerate(TEXTS * 3)]

    def alone(job):
        text, fmt, n = job
        options = {}
        if fmt and fmt["type"] == "json_schema":
            options["json_schema"] = fmt["json_schema"]["schema"]
        elif fmt:
            options["json_object"] = True
        return generate(tiny_lm, text, max_tokens=n * 4 if fmt else n, **options).text

    expected = [alone(j) for j in jobs]

    def run(job):
        text, fmt, n = job
        options = {"response_format": fmt} if fmt else {}
        stream = chat(client, text, max_tokens=n * 4 if fmt else n, stream=True, **options)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    chat(client, "warm up", max_tokens=1)  # the engine's generator exists from here on
    gen = live.engine._gens[client.base_model]
    inserted, insert = [], gen.insert

    def spy(prompt, *args, logits_processors=(), **kwargs):
        inserted.append(bool(logits_processors))
        return insert(prompt, *args, logits_processors=logits_processors, **kwargs)

    gen.insert = spy
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(run, jobs))
    finally:
        del gen.insert
    assert got == expected
    assert sorted(inserted) == sorted(fmt is not None for _, fmt, _ in jobs)


BAD_FORMATS = [
    ({"type": "xml"}, "response_format"),
    ({"type": "json_schema"}, "response_format"),
    (
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": "ten"}},
        },
        "response_format",
    ),  # fmt: skip
    (
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}},
        },
        "response_format",
    ),  # fmt: skip
]


def test_bad_formats_are_400_and_the_server_still_answers(live, client, tiny_lm):
    for fmt, param in BAD_FORMATS:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, "x", max_tokens=4, response_format=fmt)
        error = caught.value.body
        assert caught.value.status_code == 400
        assert error["param"] == param, (fmt, error)
        assert error["message"] and "Traceback" not in error["message"]
    # A stop string would fight the format over where the answer ends.
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "x", max_tokens=4, stop=["}"], response_format={"type": "json_object"})
    assert caught.value.body["param"] == "stop"
    # Not an object at all: the request's shape is wrong (422).
    body = json.dumps({"model": client.base_model, "messages": [{"role": "user", "content": "x"}],
                       "response_format": "json"}).encode()  # fmt: skip
    status, answer = http("POST", f"{live.url}/v1/chat/completions", body,
                          {"Content-Type": "application/json"})  # fmt: skip
    assert status == 422 and answer["error"]["param"] == "response_format"
    assert chat(client, "the lazy dog", max_tokens=6).choices[0].message.content == (
        generate(tiny_lm, "the lazy dog", max_tokens=6).text
    )
