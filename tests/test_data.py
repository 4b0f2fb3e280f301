"""Training data: formats, loss weights token by token, bad lines, truncation, batching."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_recipe

import mlxlocal
from mlxlocal.data import (
    MAX_LINE_BYTES,
    DataSection,
    Example,
    Sample,
    file_format,
    has_chat_template,
    load_examples,
    read_rows,
    tokenize_sample,
)
from mlxlocal.errors import MlxLocalError
from mlxlocal.evaluate import evaluate
from mlxlocal.tiny import CHAT_TEMPLATE, write_tokenizer
from mlxlocal.train.batches import first_fit, iterate_batches, num_batches, plan_batches
from mlxlocal.train.preflight import validate_recipe

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Add 2 and 3"},
    {"role": "assistant", "content": "5"},
]


def _tokenizer(folder: Path, template: str | None = CHAT_TEMPLATE, hf: bool = False):
    from mlx_lm.tokenizer_utils import load
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").exists():
        write_tokenizer(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder) if hf else load(folder)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("tok"))


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _data(train: str, **kw) -> DataSection:
    return DataSection(train=train, **kw)


def _expected_chat(tok, messages):
    """The tiny template's tokens built piece by piece: role marker, newline, content, end."""
    tokens, weights = [], []
    for m in messages:
        ids = [tok.convert_tokens_to_ids(f"<|{m['role']}|>")] + tok.encode("\n")
        tokens += ids
        weights += [0] * len(ids)
        ids = tok.encode(m["content"]) + [tok.convert_tokens_to_ids("<|end|>")] + tok.encode("\n")
        tokens += ids
        weights += [int(m["role"] == "assistant")] * len(ids)
    return tokens, weights


@pytest.mark.parametrize("hf", [False, True], ids=["mlx-lm wrapper", "transformers"])
def test_chat_loss_on_every_assistant_turn_token_by_token(tmp_path, hf):
    tok = _tokenizer(tmp_path / "tok", hf=hf)
    train = _write(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    (example,), report = load_examples(_data(train), tok)
    tokens, weights = _expected_chat(tok, CONVERSATION)
    assert example.tokens == tokens
    assert example.weights == weights
    trained = tok.decode([t for t, w in zip(example.tokens, example.weights, strict=True) if w])
    assert trained == "Hello!<|end|>\n5<|end|>\n"
    assert report.format == "chat" and report.trained_tokens == sum(weights)


def test_train_on_prompt_weights_everything(tmp_path, tok):
    train = _write(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    (example,), _ = load_examples(_data(train, train_on_prompt=True), tok)
    assert example.weights == [1] * len(example.tokens)


def test_template_that_only_closes_the_whole_conversation(tmp_path):
    # "</s>" follows the last message only: a prefix render ends in it, the full one does not
    # there, so the first answer's weights must stop before it.
    tok = _tokenizer(tmp_path / "tok", CHAT_TEMPLATE.replace("{% endfor %}", "{% endfor %}</s>"))
    train = _write(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    (example,), _ = load_examples(_data(train), tok)
    trained = tok.decode([t for t, w in zip(example.tokens, example.weights, strict=True) if w])
    assert trained == "Hello!<|end|>\n5<|end|>\n</s>"


def test_tools_reach_the_chat_template_and_are_not_trained(tmp_path):
    template = "{% if tools %}<|system|>\nTools: {{ tools | tojson }}<|end|>\n{% endif %}"
    tok = _tokenizer(tmp_path / "tok", template + CHAT_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    row = {"messages": CONVERSATION[1:3], "tools": tools}
    (example,), _ = load_examples(_data(_write(tmp_path / "t.jsonl", [row])), tok)
    assert '"name": "add"' in tok.decode(example.tokens)
    assert tok.decode([t for t, w in zip(example.tokens, example.weights, strict=True) if w]) == (
        "Hello!<|end|>\n"
    )


def _trained_text(tok, example):
    return tok.decode([t for t, w in zip(example.tokens, example.weights, strict=True) if w])


def test_formats_are_detected_and_rendered(tmp_path, tok):
    rows = {
        "text": {"text": "The quick brown fox."},
        "completion": {"prompt": "Capital of France?", "completion": "Paris"},
        "instruction": {"instruction": "Translate", "input": "chat", "output": "cat"},
    }
    for fmt, row in rows.items():
        (example,), report = load_examples(_data(_write(tmp_path / f"{fmt}.jsonl", [row])), tok)
        assert report.format == fmt
        if fmt == "text":
            assert example.tokens == tok.encode(row["text"]) + [tok.eos_token_id]
            assert example.weights == [1] * len(example.tokens)
    (example,), _ = load_examples(_data(str(tmp_path / "completion.jsonl")), tok)
    user = [{"role": "user", "content": "Capital of France?"}]
    assert (
        example.tokens == _expected_chat(tok, [*user, {"role": "assistant", "content": "Paris"}])[0]
    )
    assert _trained_text(tok, example) == "Paris<|end|>\n"
    (example,), _ = load_examples(_data(str(tmp_path / "instruction.jsonl")), tok)
    assert "<|user|>\nTranslate\n\nchat<|end|>" in tok.decode(example.tokens)
    assert _trained_text(tok, example) == "cat<|end|>\n"


def test_field_remapping_and_system_prompt(tmp_path, tok):
    train = _write(tmp_path / "qa.jsonl", [{"question": "Two plus two?", "answer": "four"}])
    data = _data(
        train, fields={"prompt": "question", "completion": "answer"}, system_prompt="Be brief."
    )
    (example,), report = load_examples(data, tok)
    assert report.format == "completion"
    text = tok.decode(example.tokens)
    assert text.startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nTwo plus two?<|end|>")
    assert _trained_text(tok, example) == "four<|end|>\n"


def test_completion_without_a_chat_template_is_verbatim(tmp_path):
    tok = _tokenizer(tmp_path / "tok", template=None)
    train = _write(tmp_path / "c.jsonl", [{"prompt": "The quick brown", "completion": " fox"}])
    (example,), _ = load_examples(_data(train), tok)
    assert example.tokens == tok.encode("The quick brown fox") + [tok.eos_token_id]
    assert _trained_text(tok, example) == " fox</s>"
    chat = _write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(MlxLocalError, match="needs the model's chat template"):
        load_examples(_data(chat), tok)


def test_csv_with_a_multiline_cell_and_line_numbers(tmp_path, tok):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completion\n"two\nlines",yes\nthird,\nfourth,ok\n')
    with pytest.raises(MlxLocalError, match=r"^data.csv:4: empty 'completion'"):
        load_examples(_data(str(path)), tok)
    examples, report = load_examples(_data(str(path), bad_lines="skip"), tok)
    assert len(examples) == 2 and report.bad_lines == 1
    assert report.notes == ["data.csv:4: empty 'completion'"]
    assert "<|user|>\ntwo\nlines<|end|>" in tok.decode(examples[0].tokens)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', r"t.jsonl:2: not valid JSON"),
        ('["a list"]', r"t.jsonl:2: expected a JSON object"),
        ('{"messages": []}', r"t.jsonl:2: empty conversation"),
        ('{"prompt": "only a prompt"}', r"t.jsonl:2: no 'messages' field"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', r"t.jsonl:2: no assistant"),
        ('{"messages": [{"content": "hi"}]}', r"t.jsonl:2: message 1 has no 'role'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, tok, line, message):
    train = _write(tmp_path / "t.jsonl", [{"messages": CONVERSATION}, line, ""])
    with pytest.raises(MlxLocalError, match=message):
        load_examples(_data(train), tok)
    examples, report = load_examples(_data(train, bad_lines="skip"), tok)
    assert len(examples) == 1 and report.bad_lines == 1 and report.notes[0].startswith("t.jsonl:2")


def test_undetectable_format_and_missing_file(tmp_path, tok):
    with pytest.raises(
        MlxLocalError, match=r"u.jsonl:1: cannot tell the data format .*data.fields"
    ):
        load_examples(_data(_write(tmp_path / "u.jsonl", [{"question": "?"}])), tok)
    with pytest.raises(MlxLocalError, match="no such data file"):
        load_examples(_data(str(tmp_path / "missing.jsonl")), tok)
    with pytest.raises(MlxLocalError, match="no such built-in dataset"):
        load_examples(_data("builtin:nope.jsonl"), tok)


def test_too_long_examples_are_truncated_or_dropped_and_counted(tmp_path, tok):
    long_answer = " ".join(["fox"] * 60)
    rows = [
        {"messages": CONVERSATION},
        {"messages": [CONVERSATION[1], {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": long_answer}, CONVERSATION[2]]},
    ]
    train = _write(tmp_path / "t.jsonl", rows)
    lengths = [len(e.tokens) for e in load_examples(_data(train), tok)[0]]
    assert lengths[0] < 48 < lengths[1]
    examples, report = load_examples(_data(train, max_length=48), tok)
    # Row 2 is cut to 48 tokens; row 3's answer lies beyond 48 tokens, so nothing is left.
    assert [len(e.tokens) for e in examples] == [len(examples[0].tokens), 48]
    assert (report.truncated, report.dropped, report.examples) == (1, 1, 2)
    assert report.notes == [
        f"t.jsonl:2: truncated from {lengths[1]} to 48 tokens",
        "t.jsonl:3: dropped: nothing to learn within max_length 48",
    ]
    examples, report = load_examples(_data(train, max_length=48, too_long="drop"), tok)
    assert (report.truncated, report.dropped, report.examples) == (0, 2, 1)
    assert "2 dropped" in report.summary()


def test_valid_fraction_holds_out_a_fixed_disjoint_part(tmp_path, tok):
    rows = [{"text": f"example number {i}"} for i in range(40)]
    data = _data(_write(tmp_path / "t.jsonl", rows), valid_fraction=0.25)
    train, _ = load_examples(data, tok, "train")
    valid, report = load_examples(data, tok, "valid")
    assert (len(train), len(valid)) == (30, 10)
    seen = {tuple(e.tokens) for e in train} | {tuple(e.tokens) for e in valid}
    assert len(seen) == 40
    assert [e.tokens for e in load_examples(data, tok, "valid")[0]] == [e.tokens for e in valid]
    assert load_examples(_data(data.train), tok, "valid")[0] == []


def test_the_shipped_tiny_chat_set_loads(tok):
    examples, report = load_examples(_data("builtin:tiny-chat.jsonl", max_length=128), tok)
    assert report.examples == 72 and report.truncated == report.dropped == 0
    assert all(any(e.weights) for e in examples)


# --- batching ----------------------------------------------------------------------------------


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        weights = rng.integers(0, 2, n).tolist()
        out.append(Example(rng.integers(1, 500, n).tolist(), weights))
    return out


def _naive_first_fit(lengths, capacity):
    rows, free = [], []
    for i, n in enumerate(lengths):
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= n
    return rows


def test_first_fit_matches_the_plain_definition():
    lengths = np.random.default_rng(3).integers(1, 200, 500).tolist()
    assert first_fit(lengths, 256) == _naive_first_fit(lengths, 256)
    with pytest.raises(ValueError):
        first_fit([300], 256)


def _padding(batches):
    real = sum(int((np.array(b.segments) > 0).sum()) for b in batches)
    total = sum(b.tokens.size for b in batches)
    return 1 - real / total


@pytest.mark.parametrize("packing", [True, False])
def test_batches_hold_every_example_once_with_little_padding(packing):
    lengths = np.random.default_rng(1).integers(10, 1001, 400).tolist()
    examples = _examples(lengths)
    batches = list(iterate_batches(examples, 4, 1024, packing, seed=0, epoch=0))
    assert len(batches) == num_batches(examples, 4, 1024, packing, 0, 0)
    assert _padding(batches) < 0.03
    found = []
    for b in batches:
        tokens, weights, segments = (np.array(a) for a in (b.tokens, b.weights, b.segments))
        assert tokens.dtype == np.int32 and weights.dtype == np.float32
        assert tokens.shape[1] <= 1024 and tokens.shape[0] <= 4
        for row in range(tokens.shape[0]):
            count = segments[row].max()
            assert packing or count == 1
            for k in range(1, count + 1):
                (at,) = np.nonzero(segments[row] == k)
                assert at[-1] - at[0] + 1 == len(at)  # contiguous
                found.append((tuple(tokens[row, at]), tuple(weights[row, at])))
            assert (tokens[row][segments[row] == 0] == 0).all()
            assert (weights[row][segments[row] == 0] == 0).all()
    expected = [(tuple(e.tokens), (0.0, *map(float, e.weights[1:]))) for e in examples]
    assert sorted(found) == sorted(expected)


def test_bucketing_beats_random_batching_on_padding():
    lengths = np.random.default_rng(2).integers(10, 1001, 400).tolist()
    examples = _examples(lengths)
    bucketed = _padding(list(iterate_batches(examples, 8, 1024, False, 0, 0)))
    rng = np.random.default_rng(0).permutation(400)
    random_batches = [max(lengths[i] for i in rng[j : j + 8]) * 8 for j in range(0, 400, 8)]
    random_padding = 1 - sum(lengths) / sum(random_batches)
    assert bucketed < 0.05 < random_padding


@pytest.mark.parametrize("packing", [True, False])
def test_order_is_deterministic_per_seed_and_epoch_and_resumable(packing):
    examples = _examples(np.random.default_rng(4).integers(5, 120, 200).tolist())

    def run(seed, epoch, start=0):
        batches = iterate_batches(examples, 4, 128, packing, seed, epoch, start)
        return [np.array(b.tokens).tolist() for b in batches]

    first = run(0, 0)
    assert run(0, 0) == first
    assert run(0, 1) != first and run(1, 0) != first
    assert run(0, 0, start=5) == first[5:]
    assert plan_batches([3, 4], 2, 8, True, 0, 0) == plan_batches([3, 4], 2, 8, True, 0, 0)


# One reader for every verb: the same messy file gives the same rows, bad lines and line numbers.
MESSY_ROWS = [("Great film", "good"), ("two\r\nlines, and a comma", "bad"), ("Dull", "bad")]


def _messy_file(folder: Path, kind: str) -> tuple[Path, list[int], list[int]]:
    """A file with a BOM, CRLF line ends, a blank line, a multi-line value, a malformed line
    and a line that is not UTF-8; returns it, the lines of its good rows and of its bad ones."""
    good, bad = [1, 2, 6], [3, 5]  # JSONL lines
    if kind == "csv":
        quoted = [f'"{p}",{c}\r\n' for p, c in MESSY_ROWS]
        lines = ["prompt,completion\r\n", quoted[0], quoted[1], "one,two,three\r\n", "\r\n"]
        lines += ["caf\udce9,good\r\n", quoted[2]]
        good, bad = [2, 3, 8], [5, 7]
    else:
        rows = [json.dumps({"prompt": p, "completion": c}) + "\r\n" for p, c in MESSY_ROWS]
        lines = [rows[0], rows[1], '{"prompt": "broken\r\n', "\r\n"]
        lines += ['{"prompt": "caf\udce9", "completion": "good"}\r\n', rows[2]]
    path = folder / f"messy.{kind}"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(lines).encode("utf-8", "surrogateescape"))
    return path, good, bad


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_messy_file_reads_the_same_in_training_eval_batch_and_validate(
    tiny_lm, tiny_mlx, tmp_path, kind
):
    path, good, bad = _messy_file(tmp_path, kind)
    first_bad = f"messy.{kind}:{bad[0]}:"
    skipping = DataSection(train=str(path), bad_lines="skip")
    recipe = write_recipe(tmp_path, tiny_mlx, data__train=str(path))

    # Every reader stops at the same first bad line unless told to skip.
    with pytest.raises(MlxLocalError, match=first_bad):
        load_examples(DataSection(train=str(path)), tiny_lm.tokenizer)
    with pytest.raises(MlxLocalError, match=first_bad):
        evaluate(tiny_lm, str(path), "classify")
    with pytest.raises(MlxLocalError, match=first_bad):
        validate_recipe(recipe)
    with pytest.raises(MlxLocalError, match=first_bad):
        mlxlocal.batch(tiny_lm, path, tmp_path / "stop.jsonl", field="prompt", max_tokens=1)

    # Training: the good rows, exactly as the data layer renders them; the bad ones counted.
    examples, report = load_examples(skipping, tiny_lm.tokenizer)
    chat = has_chat_template(tiny_lm.tokenizer)
    expected = [
        tokenize_sample(
            Sample(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": c}]),
            tiny_lm.tokenizer,
            chat,
            False,
        )
        for p, c in MESSY_ROWS
    ]
    assert examples == expected
    assert [note.split(": ")[0] for note in report.notes] == [f"messy.{kind}:{n}" for n in bad]

    # Evaluation: the same prompts and labels.
    result = evaluate(tiny_lm, skipping, "classify")
    assert [(e["prompt"], e["label"]) for e in result.examples] == MESSY_ROWS

    # Validation: the same counts.
    report_lines = validate_recipe(recipe, ["data.bad_lines=skip"])
    assert report_lines[-1].endswith(f"3 examples (completion), {len(bad)} bad lines skipped")

    # Batch: the same rows with their line numbers as ids, an error record for each bad line.
    out = tmp_path / "out.jsonl"
    mlxlocal.batch(tiny_lm, path, out, field="prompt", max_tokens=1, on_error="skip")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == sorted(good + bad)
    assert [(r["prompt"], r["completion"]) for r in records if "error" not in r] == MESSY_ROWS
    assert [r["id"] for r in records if "error" in r] == bad


# --- encodings, delimiters, ambiguous formats, column mapping ------------------------------------

ACCENTED = [("Café crème", "good"), ("Déjà vu; naïve", "bad"), ("Straße", "good")]


@pytest.mark.parametrize(
    "encoding, bom, named",
    [
        ("utf-8", b"", None),
        ("utf-8", codecs.BOM_UTF8, None),
        ("utf-16-le", codecs.BOM_UTF16_LE, None),  # Excel's "Unicode Text"
        ("utf-16-be", codecs.BOM_UTF16_BE, None),
        ("utf-32-le", codecs.BOM_UTF32_LE, None),
        ("cp1252", b"", "cp1252"),
        ("latin-1", b"", "latin-1"),
        ("shift_jis", b"", "shift_jis"),
    ],
)
@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_every_encoding_and_delimiter_reads_the_same_rows(
    tmp_path, encoding, bom, named, delimiter
):
    rows = ACCENTED if encoding != "shift_jis" else [("日本語", "good"), ("a;b", "bad")]
    lines = [f"prompt{delimiter}completion"] + [f'"{p}"{delimiter}{c}' for p, c in rows]
    path = tmp_path / "data.csv"
    path.write_bytes(bom + "\r\n".join(lines).encode(encoding) + "\r\n".encode(encoding))
    read, _ = read_rows(path, encoding=named)
    assert [(r.values["prompt"], r.values["completion"]) for r in read] == rows
    assert [r.line for r in read] == list(range(2, 2 + len(rows)))
    assert file_format(path, named).delimiter == delimiter


def test_a_latin1_file_without_encoding_names_the_byte_and_the_fix(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"text": "plain"}) + "\n"
    path.write_bytes(good.encode() + '{"text": "café"}\n'.encode("latin-1"))
    offset = len(good) + len('{"text": "caf')
    with pytest.raises(MlxLocalError) as e:
        read_rows(path)
    message = str(e.value)
    assert message.startswith(f"data.jsonl:2: byte 0xe9 at offset {offset} of the file")
    assert "--encoding cp1252" in message and "data.encoding" in message
    assert "\n" not in message
    assert [r.values["text"] for r in read_rows(path, encoding="latin-1")[0]] == ["plain", "café"]
    with pytest.raises(MlxLocalError, match="unknown encoding 'latin-9x'"):
        read_rows(path, encoding="latin-9x")
    with pytest.raises(MlxLocalError, match=r"data.encoding: .*unknown encoding"):
        validate_recipe_data(tmp_path, path, "data.encoding=latin-9x")


def validate_recipe_data(folder: Path, data: Path, *overrides: str):
    from mlxlocal.recipe import load_recipe

    recipe = folder / "r.yaml"
    recipe.write_text(
        f"model: {{path: m}}\ndata: {{train: {data}}}\ntraining: {{steps: 1}}\noutput: o\n"
    )
    return load_recipe(recipe, list(overrides))


def test_sniffing_is_checked_against_the_header(tmp_path):
    # One column whose cells hold commas and semicolons: the header has no delimiter at all.
    path = tmp_path / "one.csv"
    path.write_text('text\n"a, b; c"\n"d, e, f"\n')
    assert [r.values for r in read_rows(path)[0]] == [{"text": "a, b; c"}, {"text": "d, e, f"}]
    path.write_text("text;label\na, b;x\nc, d;y\n")  # commas in cells, semicolons between
    assert file_format(path).delimiter == ";"
    (tmp_path / "t.tsv").write_text("text,x\tlabel\na\tb\n")  # .tsv is tabs, whatever it holds
    assert read_rows(tmp_path / "t.tsv")[0][0].values == {"text,x": "a", "label": "b"}


def test_an_ambiguous_format_says_what_it_picked_and_why(tmp_path, tok):
    path = Path(_write(tmp_path / "d.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}]))
    notes = []
    examples, report = load_examples(_data(str(path)), tok, note=notes.append)
    assert report.format == "completion" and len(notes) == 1
    assert "read as completion" in notes[0] and "'text' (text)" in notes[0]
    assert "data.format" in notes[0]
    _, report = load_examples(_data(str(path), format="text"), tok, note=notes.append)
    assert report.format == "text" and len(notes) == 1  # chosen: nothing to say
    _write(tmp_path / "e.jsonl", [{"prompt": "p", "completion": "c"}])
    load_examples(_data(str(tmp_path / "e.jsonl")), tok, note=notes.append)
    assert len(notes) == 1  # unambiguous: nothing to say


def test_eval_maps_columns_and_reads_other_encodings(tiny_lm, tmp_path):
    rows = [("Café great", "good"), ("Dull", "bad"), ("Très bien", "good")]
    (tmp_path / "in.csv").write_bytes(
        ("review;verdict\n" + "".join(f"{r};{v}\n" for r, v in rows)).encode("cp1252")
    )
    (tmp_path / "ref.jsonl").write_text(
        "".join(json.dumps({"prompt": r, "completion": v}) + "\n" for r, v in rows)
    )
    fields = {"prompt": "review", "completion": "verdict"}
    with pytest.raises(MlxLocalError, match="in.csv:2: byte 0xe9"):
        evaluate(tiny_lm, tmp_path / "in.csv", "classify", fields=fields)
    mapped = evaluate(tiny_lm, tmp_path / "in.csv", "classify", fields=fields, encoding="cp1252")
    reference = evaluate(tiny_lm, tmp_path / "ref.jsonl", "classify")
    assert mapped.examples == reference.examples and mapped.metrics == reference.metrics
    with pytest.raises(MlxLocalError, match="cannot tell the data format"):
        evaluate(tiny_lm, tmp_path / "in.csv", "classify", encoding="cp1252")


def test_cli_eval_field_flags(tiny_mlx, tmp_path):
    from click.testing import CliRunner

    from mlxlocal.cli import cli

    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in [("x", "yes"), ("y", "no")])
    )
    args = ["eval", str(tiny_mlx), "--data", str(tmp_path / "in.jsonl"), "--task", "classify"]
    result = CliRunner().invoke(cli, [*args, "--field", "prompt=q", "--field", "completion=a"])
    assert result.exit_code == 0, result.output
    assert "classify on" in result.stdout and "2 examples" in result.stdout
    bad = CliRunner().invoke(cli, [*args, "--field", "prompt"])
    assert bad.exit_code == 1 and "expected NAME=COLUMN" in bad.stderr


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_line_past_the_cap_is_a_bad_row_never_read_whole(tmp_path, suffix):
    """A record is an example: a line over MAX_LINE_BYTES becomes a bad row (skippable) and the
    rows after it keep their line numbers."""
    path = tmp_path / f"data{suffix}"
    huge = "x" * (MAX_LINE_BYTES + 10)
    if suffix == ".jsonl":
        lines = ['{"text": "a"}', json.dumps({"text": huge}), '{"text": "b"}']
    else:
        lines = ["text", "a", huge, "b"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MlxLocalError, match=r"data\..*:(2|3): the line is longer than 8 MiB"):
        read_rows(path)
    rows, skipped = read_rows(path, skip_bad=True)
    assert [r.values["text"] for r in rows] == ["a", "b"]
    assert [r.line for r in rows] == ([1, 3] if suffix == ".jsonl" else [2, 4])
    assert len(skipped) == 1 and skipped[0].values is None
