"""Hostile text and files as inputs (issue 13): YAML bombs, hostile JSON, devices and FIFOs.

Each is refused through the CLI with exit 1, one `error:` line, no traceback and nothing
written; YAML bombs also within a stated memory budget, measured in a child process.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import assert_clean_failure, run

# A "billion laughs": nine levels of nine aliases name 9⁹ strings in a few hundred bytes.
LAUGHS = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
    f"{cur}: &{cur} [{','.join([f'*{prev}'] * 9)}]"
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True)
]
BOMB = "training:\n  optimizer_args:\n" + "".join(f"    {line}\n" for line in LAUGHS)
BOMB_FLOW = "{" + ", ".join(LAUGHS) + "}"
SELF_REFERENCE = "training:\n  optimizer_args: &loop {x: *loop}\n"
ANCHOR = "training:\n  optimizer_args: &args {}\n"
ALIASES = "YAML aliases/anchors are not allowed"
# Peak RSS of the whole CLI process refusing a billion laughs. Measured: 44-52 MB (the refusal
# comes before any model library is imported); without it a recipe or rules bomb passes 4 GB
# (MemoryError under the cap below) and an override bomb runs for minutes.
RSS_BUDGET_MB = 200

RECIPE = """\
model:
  path: builtin:tiny
data:
  train: train.jsonl
training:
  steps: 2
output: runs/test
"""


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def write_recipe(folder: Path, text: str = RECIPE) -> Path:
    (folder / "train.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (folder / "recipe.yaml").write_text(text)
    return folder / "recipe.yaml"


# --- YAML bombs ---------------------------------------------------------------------------------


def test_the_bomb_is_small():
    assert len(BOMB.encode()) < 600 and len(BOMB_FLOW.encode()) < 600


# The billion laughs itself runs only in a child process with a memory limit (below): refused,
# it is as harmless as these; not refused, it takes the machine's memory.
@pytest.mark.parametrize("text", [SELF_REFERENCE, ANCHOR], ids=["loop", "anchor"])
def test_alias_in_a_recipe(text, tmp_path):
    path = write_recipe(tmp_path, RECIPE.replace("training:\n", text, 1))
    before = files_under(tmp_path)
    result = run("recipes", "validate", path)
    assert_clean_failure(result, f"{path}:6: {ALIASES} in recipes")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("value", ["&loop [*loop]", "{lr: &x 1, beta: *x}"], ids=["loop", "anchor"])
def test_alias_in_an_override(value, tmp_path):
    path = write_recipe(tmp_path)
    result = run("run", path, f"training.optimizer_args={value}")
    assert_clean_failure(result, "override 'training.optimizer_args=", f"{ALIASES} in overrides")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "text", ["a: &a [*a]", "lm_head: 8\nembed: &x 6\n"], ids=["loop", "anchor"]
)
def test_alias_in_a_rules_file(text, checkpoints, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    out = tmp_path / "out"
    result = run("quantize", checkpoints("llama"), out, "--rules", rules)
    line = text.count("\n", 0, text.index("&")) + 1
    assert_clean_failure(result, f"{rules}:{line}: {ALIASES} in rules files", out=out)


# Runs the CLI in a grandchild so that RUSAGE_CHILDREN sees it alone. On Linux its address space
# is capped too, so that a regression fails in seconds instead of filling the machine's memory.
MEASURE = """
import json, resource, subprocess, sys

def cap():
    if sys.platform == "linux":
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=300, preexec_fn=cap)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
peak //= 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
print(json.dumps({"rc": done.returncode, "stderr": done.stderr, "peak_mb": peak}))
"""
CLI = [sys.executable, "-c", "from mlxlocal.cli import main; main()"]


def run_capped(args: list[str], *needles: str) -> int:
    """Run the CLI in a capped child, assert a clean failure naming `needles`; its peak RSS."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert done.returncode == 0, done.stderr  # the CLI finished within its timeout
    child = json.loads(done.stdout)
    assert child["rc"] == 1 and "Traceback" not in child["stderr"], child["stderr"]
    errors = [line for line in child["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, child["stderr"]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return child["peak_mb"]


@pytest.mark.parametrize("where", ["recipes", "overrides", "rules files"])
def test_billion_laughs_fail_fast_in_bounded_memory(where, checkpoints, tmp_path):
    path = write_recipe(tmp_path)
    if where == "recipes":
        path.write_text(RECIPE.replace("training:\n", BOMB, 1))
        args, needle = ["recipes", "validate", str(path)], f"{path}:7: "
    elif where == "overrides":
        args, needle = ["recipes", "validate", str(path), f"output={BOMB_FLOW}"], "override "
    else:
        rules = tmp_path / "rules.yaml"
        rules.write_text("\n".join(LAUGHS))
        args = ["quantize", str(checkpoints("llama")), str(tmp_path / "out"), "--rules", str(rules)]
        needle = f"{rules}:1: "
    peak_mb = run_capped(args, needle, f"{ALIASES} in {where}")
    assert peak_mb < RSS_BUDGET_MB
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


# --- hostile JSON -------------------------------------------------------------------------------

HOSTILE_JSON = {
    "not-utf8": (b'{"model_type": "llama", "x": "\xff\xfe"}', "not UTF-8"),
    "syntax": (b'{"model_type": "llama",', "not valid JSON (Expecting"),
    "huge-int": (b'{"model_type": "llama", "x": ' + b"7" * 5000 + b"}", "more than 4300 digits"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "wrong-type": (b'["model_type", "llama"]', "must be a JSON object, not list"),
}


@pytest.fixture
def src(checkpoints, tmp_path):
    return Path(shutil.copytree(checkpoints("llama"), tmp_path / "src"))


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_hostile_config_json(case, src, tmp_path):
    content, needle = HOSTILE_JSON[case]
    (src / "config.json").write_bytes(content)
    out = tmp_path / "out"
    assert_clean_failure(run("convert", src, out), f"{src / 'config.json'}: ", needle, out=out)


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_hostile_index_json(case, src, tmp_path):
    content, needle = HOSTILE_JSON[case]
    (src / "model.safetensors.index.json").write_bytes(content)
    out = tmp_path / "out"
    index = src / "model.safetensors.index.json"
    assert_clean_failure(run("convert", src, out), f"{index}: ", needle, out=out)


@pytest.mark.parametrize(
    "weight_map",
    [["model.safetensors"], {"w": 5}, {"w": "../src/model.safetensors"}, None],
    ids=["list", "number", "outside", "missing"],
)
def test_index_weight_map_of_the_wrong_type(weight_map, src, tmp_path):
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out"
    assert_clean_failure(run("convert", src, out), "weight_map must map tensor names", out=out)


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_hostile_safetensors_header(case, src, tmp_path):
    content, needle = HOSTILE_JSON[case]
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(struct.pack("<Q", len(content)) + content + data[8 + n :])
    needle = "not a JSON object" if case == "wrong-type" else needle
    out = tmp_path / "out"
    result = run("convert", src, out)
    assert_clean_failure(result, f"{weights}: not a valid safetensors file", needle, out=out)


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_hostile_adapter_config(case, tmp_path):
    content, needle = HOSTILE_JSON[case]
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_bytes(content)
    (adapters / "adapters.safetensors").write_bytes(b"")
    out = tmp_path / "fused"
    result = run("fuse", tmp_path / "model", adapters, out)
    assert_clean_failure(result, str(adapters / "adapter_config.json"), needle, out=out)
    (adapters / "adapter_model.safetensors").write_bytes(b"")  # PEFT's layout
    result = run("import", "peft", adapters, out, "--model", tmp_path / "model")
    assert_clean_failure(result, str(adapters / "adapter_config.json"), needle, out=out)


def test_info_describes_a_hostile_tokenizer_as_unreadable(src):
    (src / "tokenizer.json").write_bytes(HOSTILE_JSON["deep"][0])
    (src / "tokenizer_config.json").write_bytes(HOSTILE_JSON["huge-int"][0])
    result = run("info", src)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "unreadable tokenizer.json" in result.output


ROWS = {
    "not-utf8": b'{"text": "\xff"}',
    "syntax": b'{"text": "broken',
    "huge-int": b'{"text": "x", "n": ' + b"7" * 5000 + b"}",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "wrong-type": b'["text"]',
}


@pytest.mark.parametrize("case", ROWS)
def test_hostile_data_line_is_a_bad_row(case, tmp_path):
    path = write_recipe(tmp_path)
    good = json.dumps({"text": "hello"}).encode()
    (tmp_path / "train.jsonl").write_bytes(b"\n".join([good, ROWS[case], good]) + b"\n")
    assert_clean_failure(run("recipes", "validate", path), "train.jsonl:2: ", "bad_lines: skip")
    result = run("recipes", "validate", path, "data.bad_lines=skip")
    assert result.exit_code == 0, result.output
    assert "2 examples (text), 1 bad lines skipped" in result.output


def test_batch_skips_hostile_lines(tiny_mlx, tmp_path):
    good = json.dumps({"text": "hello"}).encode()
    lines = [good, ROWS["huge-int"], ROWS["deep"], ROWS["not-utf8"], good]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    args = ["--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl"]
    result = run("batch", tiny_mlx, *args, "--max-tokens", 2, "--on-error", "skip")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [("error" in r) for r in out] == [False, True, True, True, False]
    assert "more than 4300 digits" in out[1]["error"] and "nested too deeply" in out[2]["error"]


# --- inputs that are not regular files ----------------------------------------------------------


def _not_a_file(kind: str, tmp_path: Path, name: str) -> Path:
    """A path named `name` that is a FIFO, a folder or a character device."""
    if kind == "device":
        return Path("/dev/zero")
    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


KINDS = {"fifo": "a FIFO (named pipe)", "folder": "a folder", "device": "a character device"}
# These run in a capped child: without the check /dev/zero is read until memory runs out and
# a FIFO blocks until the child's timeout.


@pytest.mark.parametrize("kind", KINDS)
def test_recipe_that_is_not_a_file(kind, tmp_path):
    path = _not_a_file(kind, tmp_path, "recipe.yaml")
    run_capped(["recipes", "validate", path], f"{path}: is {KINDS[kind]}, not a file")


@pytest.mark.parametrize("kind", KINDS)
def test_data_file_that_is_not_a_file(kind, tmp_path):
    recipe = write_recipe(tmp_path)
    data = _not_a_file(kind, tmp_path, "other.jsonl")
    args = ["recipes", "validate", recipe, f"data.train={data}"]
    run_capped(args, f"{data}: is {KINDS[kind]}, not a file")


@pytest.mark.parametrize("flag", ["--rules", "--calib"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_input_that_is_not_a_file(flag, kind, checkpoints, tmp_path):
    path = _not_a_file(kind, tmp_path, "input.txt")
    out = tmp_path / "out"
    run_capped(["quantize", checkpoints("llama"), out, flag, path], f"{path}: is {KINDS[kind]}")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
