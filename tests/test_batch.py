"""`batch`: per-record parity with `generate`, input order, bad lines, resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import mlxlocal
from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.generate import Sampling, generate

WORDS = "the quick brown fox jumps over a lazy dog and your local model keeps data".split()


def texts(n: int, seed: int = 0, longest: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, k)) for k in rng.integers(1, longest, n)]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_each_record_gets_what_generate_gives_it_alone(tiny_lm, tmp_path, batch_size):
    prompts = texts(12)
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in prompts])
    stop = ["ed"]  # some records end on a stop string, which leaves the batch early
    result = mlxlocal.batch(
        tiny_lm,
        tmp_path / "in.jsonl",
        tmp_path / "out.jsonl",
        max_tokens=12,
        stop=stop,
        batch_size=batch_size,
    )
    out = read_jsonl(tmp_path / "out.jsonl")
    expected = [generate(tiny_lm, t, max_tokens=12, stop=stop) for t in prompts]
    assert [(r["output"], r["finish_reason"], r["generated_tokens"]) for r in out] == [
        (g.text, g.finish_reason, g.generation_tokens) for g in expected
    ]
    assert {g.finish_reason for g in expected} == {"stop", "length"}
    assert result.records == 12 and result.errors == []
    assert result.generated_tokens == sum(g.generation_tokens for g in expected)
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_fields_ids_order_and_csv(tiny_lm, tmp_path):
    lines = [
        json.dumps({"id": "a7", "text": "the fox", "label": 3}),
        "",
        json.dumps({"text": "a lazy dog", "extra": [1, 2]}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_tokens=4)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert out[0]["id"] == "a7" and out[0]["label"] == 3 and out[0]["text"] == "the fox"
    assert out[1]["id"] == 3 and out[1]["extra"] == [1, 2]  # no id: its line number
    assert out[0]["output"] == generate(tiny_lm, "the fox", max_tokens=4).text

    csv_text = 'review,stars\n"the fox,\nthe dog",5\nlocal model,1\n'
    (tmp_path / "in.csv").write_text(csv_text)
    mlxlocal.batch(
        tiny_lm,
        tmp_path / "in.csv",
        tmp_path / "csv.jsonl",
        max_tokens=4,
        template="Review ({stars} stars): {review}",
    )
    out = read_jsonl(tmp_path / "csv.jsonl")
    assert [r["id"] for r in out] == [2, 4]  # the line each record starts on
    assert out[0]["review"] == "the fox,\nthe dog" and out[1]["stars"] == "1"
    prompt = "Review (5 stars): the fox,\nthe dog"
    assert out[0]["output"] == generate(tiny_lm, prompt, max_tokens=4).text


def test_bad_lines_stop_with_their_line_number_or_are_skipped(tiny_lm, tmp_path):
    lines = [json.dumps({"text": t}) for t in texts(5)]
    lines[2] = '{"text": "broken'
    lines[3] = "[1, 2]"
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MlxLocalError, match=r"in\.jsonl:3: not valid JSON"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_tokens=4)
    assert not (tmp_path / "out.jsonl").exists()
    assert len(read_jsonl(tmp_path / "out.jsonl.partial")) == 2  # kept for a re-run

    result = mlxlocal.batch(
        tiny_lm, tmp_path / "in.jsonl", tmp_path / "skip.jsonl", max_tokens=4, on_error="skip"
    )
    out = read_jsonl(tmp_path / "skip.jsonl")
    assert len(out) == 5 and [r["id"] for r in out] == [1, 2, 3, 4, 5]
    assert "not valid JSON" in out[2]["error"] and "JSON object" in out[3]["error"]
    assert "output" not in out[2] and out[4]["output"]
    assert len(result.errors) == 2 and result.errors[0].startswith(f"{tmp_path / 'in.jsonl'}:3:")


@pytest.mark.parametrize(
    "template, records, message",
    [
        (
            "Classify: {txt}",
            [{"text": "a"}],
            r"in\.jsonl:1: the template uses \{txt\}.*fields: text",
        ),
        ("Classify: {}", [{"text": "a"}], "not a field name"),
        ("Classify: {text", [{"text": "a"}], "template"),
        (None, [{"body": "a"}], r"in\.jsonl:1: no field 'text' \(fields: body\)"),
        (None, [{"text": "a", "output": "x"}], "already has a field 'output'"),
        (None, [{"text": "word " * 300}], "--truncate"),
    ],
)
def test_bad_records_and_templates(tiny_lm, tmp_path, template, records, message):
    write_jsonl(tmp_path / "in.jsonl", records)
    with pytest.raises(MlxLocalError, match=message):
        mlxlocal.batch(
            tiny_lm,
            tmp_path / "in.jsonl",
            tmp_path / "out.jsonl",
            template=template,
            max_tokens=4,
        )


def test_resume_drops_a_torn_line_and_refuses_other_settings(tiny_lm, tmp_path):
    good = [{"text": t} for t in texts(8, seed=1)]
    write_jsonl(tmp_path / "ref.jsonl", good)
    mlxlocal.batch(tiny_lm, tmp_path / "ref.jsonl", tmp_path / "ref-out.jsonl", max_tokens=6)
    reference = read_jsonl(tmp_path / "ref-out.jsonl")

    broken = [json.dumps(r) for r in good]
    broken[5] = "{oops"
    (tmp_path / "in.jsonl").write_text("\n".join(broken) + "\n")
    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    with pytest.raises(MlxLocalError, match=":6:"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, max_tokens=6)
    with open(partial, "ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"id": 6, "text": "the qu')
    write_jsonl(tmp_path / "in.jsonl", good)

    with pytest.raises(MlxLocalError, match="max_tokens changed"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, max_tokens=7)
    notes = []
    result = mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, max_tokens=6, note=notes.append)
    assert result.resumed == 5 and "5 of 8" in notes[0]
    assert read_jsonl(out) == [{**r, "id": i + 1} for i, r in enumerate(reference)]
    with pytest.raises(MlxLocalError, match="--force"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, max_tokens=6)


def test_a_killed_run_continues_with_exactly_one_output_per_input(tiny_lm, tmp_path):
    n = 300
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(n))])
    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    command = [
        sys.executable, "-m", "mlxlocal.cli", "batch", str(tiny_lm.path),
        "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--max-tokens", "12",
    ]  # fmt: skip

    def start_and_stop(sig, lines_before: int):
        # A job started in the background by a non-interactive shell (as CI may be) inherits
        # SIGINT ignored; restore it so the child behaves like a terminal Ctrl-C.
        proc = subprocess.Popen(
            [*command, "--batch-size", "1"],
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 600  # a hang guard: a loaded machine starts slowly
        while _complete_lines(partial) < lines_before:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        done = _complete_lines(partial)
        assert not out.exists() and lines_before <= done < n, done
        return proc.returncode, err.decode(), done

    code, err, first = start_and_stop(signal.SIGINT, 3)  # Ctrl-C
    assert code == 130 and "re-run the same command to continue" in err
    code, err, second = start_and_stop(signal.SIGKILL, first + 3)  # kill -9
    assert code == -signal.SIGKILL
    finish = subprocess.run([*command, "--batch-size", "32"], capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert f"resuming: {second} of {n}" in finish.stderr

    got = read_jsonl(out)
    assert [r["id"] for r in got] == [f"r{i}" for i in range(n)]
    mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", tmp_path / "ref.jsonl", max_tokens=12)
    assert got == read_jsonl(tmp_path / "ref.jsonl")


def _complete_lines(path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    lines = data.split(b"\n")[:-1]
    for line in lines:
        json.loads(line)  # never a corrupt complete line
    return len(lines)


def test_cli_batch(tiny_lm, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"q": t} for t in texts(4)])
    args = ["batch", str(tiny_lm.path), "--input", str(tmp_path / "in.jsonl")]
    args += ["--output", str(tmp_path / "out.jsonl"), "--template", "Q: {q}", "--max-tokens", "5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "4 records" in result.stdout and "records/s" in result.stdout
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 4
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--force" in again.stderr
    assert CliRunner().invoke(cli, [*args, "--force"]).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # nothing left over


# --- messy real-world files: output by extension, encodings, delimiters, column mapping -------


def read_table(path, delimiter=",") -> list[dict]:
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def test_csv_in_csv_out_keeps_the_columns_and_equals_the_jsonl_output(tiny_lm, tmp_path):
    # A European Excel export: cp1252, semicolons, CRLF; the prompt column named "question".
    rows = [("Café crème?", "a;b"), ("the fox", "x"), ("lazy dog\nand fox", "y")]
    text = "question;tag\r\n" + "".join(f'"{q}";"{t}"\r\n' for q, t in rows)
    (tmp_path / "in.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(MlxLocalError, match=r"in.csv:2: byte 0xe9 at offset \d+ .*--encoding"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.csv", tmp_path / "x.csv", field="question")
    common = dict(fields={"prompt": "question"}, encoding="cp1252", max_tokens=3)
    mlxlocal.batch(tiny_lm, tmp_path / "in.csv", tmp_path / "out.csv", **common)
    mlxlocal.batch(tiny_lm, tmp_path / "in.csv", tmp_path / "out.jsonl", **common)

    raw = (tmp_path / "out.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # UTF-8 with a BOM: Excel reads it as UTF-8
    table = read_table(tmp_path / "out.csv", ";")  # the input's delimiter
    jsonl = read_jsonl(tmp_path / "out.jsonl")
    assert list(table[0]) == [
        "id",
        "question",
        "tag",
        "output",
        "finish_reason",
        "generated_tokens",
    ]
    assert [(r["question"], r["tag"]) for r in table] == rows
    assert table == [{k: str(v) for k, v in r.items()} for r in jsonl]
    assert table[0]["output"] == generate(tiny_lm, "Café crème?", max_tokens=3).text

    # .tsv: tab-separated; a JSONL input's fields become the columns, lists as JSON.
    write_jsonl(tmp_path / "in.jsonl", [{"text": "the fox", "tags": [1, 2]}, {"text": "dog"}])
    mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", tmp_path / "out.tsv", max_tokens=2)
    table = read_table(tmp_path / "out.tsv", "\t")
    assert [r["tags"] for r in table] == ["[1,2]", ""] or [r["tags"] for r in table] == [
        "[1, 2]",
        "",
    ]
    assert not (tmp_path / "out.tsv").read_bytes().startswith(b"\xef\xbb\xbf")

    with pytest.raises(MlxLocalError, match=r"\.jsonl .*\.csv"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


def test_a_csv_output_resumes_after_an_interruption(tiny_lm, tmp_path):
    prompts = texts(6, seed=3)
    good = "text\n" + "".join(f"{t}\n" for t in prompts)
    (tmp_path / "ref.csv").write_text(good)
    mlxlocal.batch(tiny_lm, tmp_path / "ref.csv", tmp_path / "ref-out.csv", max_tokens=3)
    lines = good.splitlines(keepends=True)
    lines[4] = "two,cells\n"  # line 5: a bad row stops the run after three records
    (tmp_path / "in.csv").write_text("".join(lines))
    out = tmp_path / "out.csv"
    with pytest.raises(MlxLocalError, match="in.csv:5"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.csv", out, max_tokens=3)
    assert not out.exists() and (tmp_path / "out.csv.partial").exists()
    (tmp_path / "in.csv").write_text(good)
    with pytest.raises(MlxLocalError, match=r"max_tokens changed: 3 → 4.*--force"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.csv", out, max_tokens=4)
    notes = []
    result = mlxlocal.batch(tiny_lm, tmp_path / "in.csv", out, max_tokens=3, note=notes.append)
    assert result.resumed == 3 and "3 of 6" in notes[-1]
    assert out.read_bytes() == (tmp_path / "ref-out.csv").read_bytes()
    assert len(read_table(out)) == 6
    assert sorted(os.listdir(tmp_path)) == ["in.csv", "out.csv", "ref-out.csv", "ref.csv"]


def test_prompt_column_detection_says_what_it_picked(tiny_lm, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "the fox", "text": "dog"}])
    notes = []
    mlxlocal.batch(
        tiny_lm, tmp_path / "in.jsonl", tmp_path / "a.jsonl", max_tokens=2, note=notes.append
    )
    assert [n for n in notes if "'prompt' column" in n and "--field text" in n]
    out = read_jsonl(tmp_path / "a.jsonl")[0]
    assert out["output"] == generate(tiny_lm, "the fox", max_tokens=2).text
    mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", tmp_path / "b.jsonl", max_tokens=2, field="text")
    assert (
        read_jsonl(tmp_path / "b.jsonl")[0]["output"] == generate(tiny_lm, "dog", max_tokens=2).text
    )


def test_cli_batch_field_mapping_and_encoding(tiny_lm, tmp_path):
    (tmp_path / "in.csv").write_bytes("q,sys\ncafé,Be brief.\n".encode("latin-1"))
    args = ["batch", str(tiny_lm.path), "--input", str(tmp_path / "in.csv"), "--max-tokens", "2"]
    args += ["--output", str(tmp_path / "out.csv"), "--field", "prompt=q"]
    failed = CliRunner().invoke(cli, args)
    assert failed.exit_code == 1 and "--encoding" in failed.stderr
    assert failed.stderr.count("\n") == 1  # one line
    result = CliRunner().invoke(cli, [*args, "--encoding", "latin-1", "--field", "system=sys"])
    assert result.exit_code == 0, result.output
    row = read_table(tmp_path / "out.csv")[0]
    assert row["q"] == "café"
    assert (
        row["output"]
        == generate(
            tiny_lm,
            [
                *tiny_lm.tokenizer.apply_chat_template(
                    [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "café"},
                    ],
                    add_generation_prompt=True,
                )
            ],
            max_tokens=2,
        ).text
    )
    bad = CliRunner().invoke(cli, [*args, "--field", "promt=q", "--force"])
    assert bad.exit_code == 1 and "did you mean prompt?" in bad.stderr


INSTRUCTION = (
    "You label short notes. Read the note below and answer with one word that says what "
    "it is about; keep the data local and the answer short. "
)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("penalty", [None, 1.5])
def test_a_shared_prefix_is_processed_once_with_the_same_outputs(
    tiny_lm, tmp_path, batch_size, penalty
):
    prompts = texts(10, seed=3, longest=24)
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(prompts)])
    template = INSTRUCTION + "Note: {text}"
    runs = {}
    for cached in (True, False):
        out = tmp_path / f"out-{cached}.jsonl"
        runs[cached] = mlxlocal.batch(
            tiny_lm, tmp_path / "in.jsonl", out, template=template, max_tokens=10,
            batch_size=batch_size, prefix_cache=cached,
            sampling=Sampling(repetition_penalty=penalty),  # it sees the prompt's tokens too
        )  # fmt: skip
        runs[cached] = (runs[cached], read_jsonl(out))
    (with_cache, cached_out), (without, plain_out) = runs[True], runs[False]
    assert cached_out == plain_out
    # And each equals generate on the record alone (the reference the batch path is held to).
    expected = [
        generate(tiny_lm, template.format(text=t), max_tokens=10,
                 sampling=Sampling(repetition_penalty=penalty))
        for t in prompts
    ]  # fmt: skip
    assert [r["output"] for r in cached_out] == [g.text for g in expected]
    # The instruction (and the chat template's head) came from the prefix cache, once per chunk.
    shared = len(tiny_lm.tokenizer.encode(INSTRUCTION)) // 2
    assert with_cache.prefix_tokens >= shared * len(prompts)
    assert without.prefix_tokens == 0
    assert with_cache.generated_tokens == without.generated_tokens


def test_resuming_with_the_prefix_cache(tiny_lm, tmp_path):
    good = [{"text": t} for t in texts(9, seed=4, longest=40)]
    write_jsonl(tmp_path / "in.jsonl", good)
    template = INSTRUCTION + "Note: {text}"
    whole = tmp_path / "whole.jsonl"
    mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", whole, template=template, max_tokens=8,
                   prefix_cache=False)  # fmt: skip
    broken = [json.dumps(r) for r in good]
    broken[5] = "{oops"
    (tmp_path / "in.jsonl").write_text("\n".join(broken) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(MlxLocalError, match=":6:"):
        mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, template=template, max_tokens=8)
    write_jsonl(tmp_path / "in.jsonl", good)
    # The prefix cache is no setting of the output: either run may continue the other's.
    result = mlxlocal.batch(tiny_lm, tmp_path / "in.jsonl", out, template=template, max_tokens=8)
    assert result.resumed == 5 and result.prefix_tokens > 0
    assert read_jsonl(out) == read_jsonl(whole)


def test_cli_no_prefix_cache_gives_the_same_outputs(tiny_lm, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"q": t} for t in texts(5, seed=5, longest=20)])
    outputs = []
    for flags in ([], ["--no-prefix-cache"]):
        out = tmp_path / f"out{len(flags)}.jsonl"
        args = ["batch", str(tiny_lm.path), "--input", str(tmp_path / "in.jsonl")]
        args += ["--output", str(out), "--template", INSTRUCTION + "Q: {q}", "--max-tokens", "6"]
        args += flags
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        outputs.append(read_jsonl(out))
    assert outputs[0] == outputs[1]
