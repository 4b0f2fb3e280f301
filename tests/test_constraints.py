"""Constrained decoding: every answer of a random-weight model has the shape asked for.

References: `re.fullmatch` for regexes, membership for labels, the `jsonschema` package for
schemas; unconstrained greedy decoding for "the mask changes nothing it need not"; `generate`
alone for batch. Both tokenizer kinds: byte-level BPE (the tiny Llama's) and SentencePiece.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from helpers import sentencepiece_checkpoint

from mlxlocal.batch import batch
from mlxlocal.constraints import constraint_from_response_format, from_options
from mlxlocal.errors import MlxLocalError
from mlxlocal.generate import Sampling, generate, load_model

SEEDS = range(12)
LABELS = ["positive", "negative", "neutral", "mixed feelings"]
REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["spam", "ham"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "word": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["label", "score", "word", "flags"],
    "additionalProperties": False,
}
CASES = {
    "choices": ({"choices": LABELS}, lambda text: text in LABELS),
    "regex": ({"regex": REGEX}, lambda text: re.fullmatch(REGEX, text) is not None),
    "json_schema": ({"json_schema": SCHEMA}, lambda text: _validates(text, SCHEMA)),
}


def _validates(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.fixture(scope="module")
def spm_lm(checkpoints, tmp_path_factory):
    """The tiny Llama with a SentencePiece tokenizer, converted and loaded."""
    from mlxlocal import convert

    root = tmp_path_factory.mktemp("spm")
    hf = sentencepiece_checkpoint(checkpoints("llama"), root / "hf")
    return load_model(convert(hf, root / "mlx", dtype="float32").out)


@pytest.fixture(params=["bpe", "spm"])
def lm(request, tiny_lm):
    return tiny_lm if request.param == "bpe" else request.getfixturevalue("spm_lm")


@pytest.mark.parametrize("kind", CASES)
def test_every_sampled_answer_satisfies_the_constraint(lm, kind):
    options, satisfied = CASES[kind]
    for seed in SEEDS:
        g = generate(
            lm, f"answer {seed}", max_tokens=120, sampling=Sampling(temp=1.0, seed=seed), **options
        )
        assert g.finish_reason == "stop" and g.valid, (seed, g.text)
        assert satisfied(g.text), (seed, g.text)


def test_any_json_object(lm):
    for seed in SEEDS:
        sampling = Sampling(1.0, seed=seed)
        g = generate(lm, "json please", json_object=True, max_tokens=48, sampling=sampling)
        assert g.text.startswith("{")
        if g.finish_reason == "stop":
            assert g.valid and isinstance(json.loads(g.text), dict), g.text
        else:
            assert g.finish_reason == "length" and not g.valid
    assert generate(lm, "x", json_object=True, max_tokens=2).to_json()["valid"] is False


def test_max_tokens_before_completion_is_length_and_invalid(tiny_lm):
    g = generate(tiny_lm, "long", regex="[a-z]{40}", max_tokens=3)
    assert (g.finish_reason, g.valid, len(g.tokens)) == ("length", False, 3)
    assert re.fullmatch("[a-z]+", g.text)


def test_greedy_constrained_equals_unconstrained_when_that_already_fits(lm):
    checked = 0
    for prompt in ["hello there", "the quick brown fox", "one two three", "abc", "x y z"]:
        # The longest greedy answer (up to 6 tokens) that is whole text (no partial UTF-8) and
        # has no byte-fallback token for a character the vocabulary has (llguidance allows
        # only the canonical token there; a random model may pick either, a trained one not).
        pieces = lm.tokenizer.convert_ids_to_tokens(generate(lm, prompt, max_tokens=6).tokens)
        most = next((i for i, p in enumerate(pieces) if p.startswith("<0x")), 6)
        answers = (generate(lm, prompt, max_tokens=n) for n in range(most, 0, -1))
        free = next((g for g in answers if "\ufffd" not in g.text and g.text.strip()), None)
        if free is None:
            continue
        n = len(free.tokens)
        # Labels the free answer is one of: the mask keeps every token it took.
        labelled = generate(lm, prompt, max_tokens=n, choices=[free.text, "zz"])
        assert labelled.tokens == free.tokens, prompt
        assert (labelled.text, labelled.finish_reason, labelled.valid) == (free.text, "stop", True)
        # A regex any text matches: the same tokens, to the same length.
        anything = generate(lm, prompt, max_tokens=n, regex=r"(?s).*")
        assert anything.tokens == free.tokens and anything.valid
        checked += n
    assert checked >= 4


def test_batch_equals_each_record_alone(tiny_lm, tmp_path):
    records = [
        {"id": i, "text": f"record {i} " + "words " * i, "labels": labels}
        for i, labels in enumerate(["yes,no", "red,green,blue", "a b,c d", "up,down"] * 2)
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = {
        "schema": {"json_schema": SCHEMA},
        "per-record labels": {"choices": "{labels}"},
    }
    for name, options in runs.items():
        out = tmp_path / f"{name}.jsonl"
        batch(tiny_lm, src, out, max_tokens=120, batch_size=3, **options)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == list(range(len(records)))
        for r in rows:
            single = options | (
                {"choices": r["labels"]} if options.get("choices") == "{labels}" else {}
            )
            alone = generate(tiny_lm, r["text"], max_tokens=120, **single)
            assert (r["output"], r["finish_reason"], r["valid"]) == (
                alone.text,
                alone.finish_reason,
                alone.valid,
            ), name
            assert r["valid"] and r["finish_reason"] == "stop", r
            if name == "schema":
                assert _validates(r["output"], SCHEMA)
            else:
                assert r["output"] in r["labels"].split(",")


def test_batch_marks_answers_cut_by_max_tokens_invalid(tiny_lm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n')
    batch(tiny_lm, src, tmp_path / "out.jsonl", regex="[a-z]{30}", max_tokens=4)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["finish_reason"], r["valid"]) for r in rows] == [("length", False)] * 2


BAD = {
    "unclosed group": {"regex": "a(b"},
    "look-around": {"regex": "(?=a)a"},
    "backreferences": {"regex": r"(a)\1"},
    "Unimplemented keys": {"json_schema": {"not": {"type": "string"}}},
    "Invalid type: foo": {"json_schema": {"type": "foo"}},
    "Unknown format": {"json_schema": {"type": "string", "format": "weird"}},
    "at least one label": {"choices": ","},
    "is empty": {"choices": ["a", ""]},
    "give one constraint": {"choices": "a,b", "json_object": True},
}


@pytest.mark.parametrize("message", BAD)
def test_bad_constraints_are_one_clear_line(message, tiny_lm):
    with pytest.raises(MlxLocalError, match=re.escape(message)) as e:
        generate(tiny_lm, "hi", **BAD[message])
    assert "\n" not in str(e.value)


def test_bad_combinations_and_files(tiny_lm, tmp_path):
    with pytest.raises(MlxLocalError, match="stop strings cannot"):
        generate(tiny_lm, "hi", choices="a,b", stop=["x"])
    with pytest.raises(MlxLocalError, match="ignore-eos cannot"):
        generate(tiny_lm, "hi", json_object=True, ignore_eos=True)
    bad = tmp_path / "schema.json"
    bad.write_text("{not json")
    with pytest.raises(MlxLocalError, match="schema.json"):
        generate(tiny_lm, "hi", json_schema=bad)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a", "labels": 3}\n{"text": "b"}\n')
    with pytest.raises(MlxLocalError, match="list of strings"):
        batch(tiny_lm, src, tmp_path / "out.jsonl", choices="{labels}")


def test_response_format():
    assert constraint_from_response_format(None) is None
    assert constraint_from_response_format({"type": "text"}) is None
    assert constraint_from_response_format({"type": "json_object"}).kind == "json"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    made = constraint_from_response_format(
        {"type": "json_schema", "json_schema": {"schema": schema}}
    )
    assert made == from_options(json_schema=schema)
    for bad in [{"type": "xml"}, {"type": "json_schema"}, "json"]:
        with pytest.raises(MlxLocalError):
            constraint_from_response_format(bad)


def test_cli_label_a_csv_and_one_line_errors(tiny_mlx, tmp_path):
    from click.testing import CliRunner

    from mlxlocal.cli import cli

    csv = tmp_path / "tickets.csv"
    csv.write_text('text,labels\napp crashes,"bug,question"\nhow to log in,"yes,no"\n')
    out = tmp_path / "labels.jsonl"
    run = CliRunner().invoke(
        cli,
        ["batch", str(tiny_mlx), "--input", str(csv), "--output", str(out),
         "--template", "Label: {text}", "--choices", "{labels}"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output"] in r["labels"].split(",") and r["valid"] for r in rows] == [True] * 2
    run = CliRunner().invoke(
        cli, ["generate", str(tiny_mlx), "-p", "ok?", "--choices", "yes,no", "--json"]
    )
    answer = json.loads(run.stdout.splitlines()[-1])
    assert answer["text"] in ("yes", "no") and answer["valid"] is True
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    run = CliRunner().invoke(
        cli,
        ["eval", str(tiny_mlx), "--data", "builtin:sentiment-test.jsonl", "--task", "generate",
         "--limit", "2", "--max-tokens", "120", "--json-schema", str(schema)],
    )  # fmt: skip
    assert run.exit_code == 0 and "valid 100.0%" in run.output, run.output
    bad = {
        "unclosed group": ["generate", str(tiny_mlx), "-p", "x", "--regex", "a(b"],
        "give one constraint": ["chat", str(tiny_mlx), "--choices", "a", "--json-object"],
        "--task generate only": ["eval", str(tiny_mlx), "--data", "builtin:sentiment-test.jsonl",
                                 "--task", "classify", "--regex", "a"],
        "JSON schema": ["batch", str(tiny_mlx), "--input", str(csv), "--output",
                        str(tmp_path / "o.jsonl"), "--json-schema", str(csv)],
    }  # fmt: skip
    for message, args in bad.items():
        run = CliRunner().invoke(cli, args)
        assert run.exit_code == 1 and message in run.output, (args, run.output)
        assert len(run.output.strip().splitlines()) == 1 and "Traceback" not in run.output
    assert not (tmp_path / "o.jsonl").exists()


def test_chat_answers_under_a_constraint(tiny_lm):
    from mlxlocal.chat import ChatSession

    session = ChatSession(tiny_lm, choices=["yes", "no"], max_tokens=8)
    for message in ["hi", "again?"]:
        answer = session.send(message)
        assert "".join(answer) in ("yes", "no") and answer.result.valid
