"""Hostile inputs for every verb (issue 13): a corpus generator, a runner that measures each case
in its own CLI process, and seeded random mutations of valid files for `make fuzz`.

Every case is a folder holding the hostile thing (a model, an adapter, a recipe, a data file, a
FIFO as an output...) and the command line that hands it to one verb of the installed `mlxlocal`.
What every case must show, whatever the input:

- exit 1 (a mutation may also be harmless: exit 0), exactly one `error:` line, no traceback;
- nothing created in the case's folder but the command's own output, nothing of the input changed,
  its private TMPDIR left empty, no hidden `.OUT.tmp-*`/`.old-*` leftovers;
- no code from a checkpoint run (the evil pickle and tokenizer leave a mark when they run);
- the child's peak RSS (from `os.wait4`, for that process alone) under RSS_BUDGET_MB.

The builders of hostile files live with the tests that pin their messages (test_hostile_*.py,
torch_bin_files.py, test_remote_code.py); this module only combines them per verb.

    python hostile_corpus.py --minutes 5 --seed 1 --jobs 2     # what `make fuzz` runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# A tiny model's verbs peak at ~300 MB (the MLX + transformers import floor); training ~450 MB.
# Without the budgets of issue 13 the hostile files here reach several GB.
RSS_BUDGET_MB = 700
AS_LIMIT = 6 << 30  # address-space cap of each child: a regression fails fast, not the machine
TIMEOUT_S = 300

MODEL_VERBS = ["generate", "chat", "batch", "eval", "quantize", "export gguf", "export ollama"]
ADAPTER_VERBS = [
    "fuse",
    "export peft",
    "export gguf --adapter",
    "import peft",
    "generate --adapter",
]
# Verbs that write an output a hostile path (a FIFO, a device) is given as.
OUTPUT_VERBS = [
    "convert",
    "quantize",
    "export gguf",
    "export ollama",
    "export peft",
    "fuse",
    "import peft",
    "eval",
    "batch",
]
VERBS = [
    "convert",
    "verify",
    "info",
    "quantize",
    "generate",
    "chat",
    "batch",
    "eval",
    "run",
    "recipes validate",
    "export gguf",
    "export peft",
    "export ollama",
    "fuse",
    "import peft",
]


@dataclass
class Base:
    """The valid artifacts every hostile case starts from."""

    hf: Path  # a tiny Hugging Face checkpoint (safetensors)
    mlx: Path  # the same, converted
    gguf: Path  # the same, exported (f32)
    adapter: Path  # a LoRA adapter for mlx, in mlx-lm's layout
    peft: Path  # the same adapter as a PEFT folder


# batch chooses its format by the output's extension: an output named `out` would be refused
# before any hostile input is read (every batch case would pass for the wrong reason).
BATCH_OUT = "out.jsonl"
BATCH_KEPT = (f"{BATCH_OUT}.partial", f"{BATCH_OUT}.partial-settings.json")
BATCH_FILES = (BATCH_OUT, *BATCH_KEPT)


@dataclass
class Case:
    verb: str
    kind: str
    args: list = field(default_factory=list)  # after `mlxlocal`; str or bytes (argv bytes)
    stdin: bytes = b""
    outputs: tuple[str, ...] = ("out",)  # names in the case folder the command may create
    expect: tuple[int, ...] = (1,)
    ci: bool = False  # in the fast subset CI runs
    dir: Path | None = None
    make: Callable[[Path], list] | None = None  # writes the case's folder, returns its args
    # What a failed run may leave for its re-run to continue: batch's partial output.
    kept: tuple[str, ...] = BATCH_KEPT
    # A regex the `error:` line must match, naming what is wrong (the file, key or flag);
    # Corpus.cases() fills it from the kind (says_by_kind) where the case gives none.
    says: str | None = None


@dataclass
class Outcome:
    case: Case
    rc: int
    output: str
    peak_mb: int
    problems: list[str]
    seconds: float = 0.0


def build_base(root: Path) -> Base:
    """Write the valid artifacts under `root` (~20 s on one core)."""
    from helpers import make_hf_checkpoint

    from mlxlocal import convert

    hf = make_hf_checkpoint("llama", root / "hf")
    return base_from(hf, convert(hf, root / "mlx").out, root)


def base_from(hf: Path, mlx: Path, root: Path) -> Base:
    from helpers import make_adapter

    from mlxlocal.export.gguf import export_gguf
    from mlxlocal.export.peft import export_peft

    adapter = make_adapter(mlx, root / "adapter")
    return Base(
        hf,
        mlx,
        export_gguf(mlx, root / "m.gguf", type="f32").out,
        adapter,
        export_peft(adapter, root / "peft"),
    )


# --- hostile things, each written into a case folder ---------------------------------------------


def _json_cases() -> dict[str, bytes]:
    from test_hostile_inputs import HOSTILE_JSON

    return {name: content for name, (content, _) in HOSTILE_JSON.items()}


def _set_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


def _with_header(weights: Path, header: bytes, length: int | None = None) -> None:
    """Replace a safetensors header (its stated length: `length`, or the true one)."""
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    size = len(header) if length is None else length
    weights.write_bytes(struct.pack("<Q", size) + header + data[8 + n :])


def _many_tiny_layers(folder: Path, layers: int = 20_000) -> None:
    """A header naming `layers` numbered layers of one float each, and a config asking for them."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    for i in range(2, layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(1, np.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    _set_json(folder / "config.json", num_hidden_layers=layers)


def _template(folder: Path, source: str) -> None:
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    settings["chat_template"] = source + settings["chat_template"]
    path.write_text(json.dumps(settings))


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def model_kinds() -> dict[str, Callable[[Path], None]]:
    """Corruptions of a checkpoint folder (HF or MLX): name → what it does to the folder."""
    kinds: dict[str, Callable[[Path], None]] = {}
    for name, content in _json_cases().items():
        kinds[f"config-{name}"] = lambda d, c=content: (d / "config.json").write_bytes(c)
        kinds[f"header-{name}"] = lambda d, c=content: _with_header(d / "model.safetensors", c)
        kinds[f"index-{name}"] = lambda d, c=content: (
            d / "model.safetensors.index.json"
        ).write_bytes(c)
    kinds |= {
        "header-length-2^62": lambda d: _with_header(d / "model.safetensors", b"{}", 1 << 62),
        "header-length-past-end": lambda d: _with_header(d / "model.safetensors", b"{}", 10**6),
        "weights-truncated": lambda d: _truncate(d / "model.safetensors", 0.5),
        "weights-missing": lambda d: [f.unlink() for f in d.glob("model*.safetensors*")],
        "many-tiny-layers": _many_tiny_layers,
        "layers-1e7": lambda d: _set_json(d / "config.json", num_hidden_layers=10**7),
        "hidden-0": lambda d: _set_json(d / "config.json", hidden_size=0),
        "vocab-1e9": lambda d: _set_json(d / "config.json", vocab_size=10**9),
        "model-type-cache": lambda d: _set_json(d / "config.json", model_type="cache"),
        "rope-theta-string": lambda d: _set_json(d / "config.json", rope_theta="fast"),
        "eos-string": lambda d: _set_json(d / "config.json", eos_token_id="</s>"),
        "dtype-unknown": lambda d: _set_json(d / "config.json", dtype="Float32"),  # fuzz found
        "quantization-4": lambda d: _set_json(d / "config.json", quantization=4),
        "config-fifo": lambda d: _fifo(d / "config.json"),
        "config-dev-zero": lambda d: _dev_zero(d / "config.json"),
        "tokenizer-deep": lambda d: (d / "tokenizer.json").write_bytes(_json_cases()["deep"]),
        "tokenizer-config-huge-int": lambda d: (d / "tokenizer_config.json").write_bytes(
            _json_cases()["huge-int"]
        ),
        "tokenizer-code": _custom_tokenizer,
        "tool-parser-bogus": lambda d: _set_json(d / "tokenizer_config.json", tool_parser_type="x"),
    }
    return kinds


TEMPLATE_KINDS = {
    "template-zero-division": "{{ 1 // 0 }}",
    "template-recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "template-range": "{% for i in range(10**12) %}{% endfor %}",
}
TEMPLATE_ERRORS = {
    "template-zero-division": "ZeroDivisionError",
    "template-recursion": "RecursionError",
    "template-range": "OverflowError: Range too big",
}


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


class Evil:
    """Pickles as a call of os.system: the restricted unpickler must refuse to run it."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def _custom_tokenizer(folder: Path) -> None:
    from test_remote_code import with_custom_tokenizer

    tmp = folder.with_name(folder.name + "-custom")
    with_custom_tokenizer(folder, tmp)
    shutil.rmtree(folder)
    tmp.rename(folder)


def bin_kinds(mark: str) -> dict[str, Callable[[Path], None]]:
    """pytorch_model.bin files, each replacing the folder's safetensors."""
    from torch_bin_files import FakeTensor, StorageRef, write_checkpoint

    def only_bin(folder: Path, obj, storages: dict, pid_ok: bool = True) -> Path:
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        return write_checkpoint(folder / "pytorch_model.bin", obj, storages, pid_ok)

    def views(folder: Path) -> None:  # 256 views of one 4 MB storage: 1 GB once materialised
        ref = StorageRef("0", 1 << 20)
        name = "model.layers.{}.mlp.up_proj.weight"
        obj = {name.format(i): FakeTensor(ref, 0, (1024, 1024), (1024, 1)) for i in range(256)}
        only_bin(folder, obj, {"0": bytes(4 << 20)})

    def stride0(folder: Path) -> None:  # one float, viewed as 2^32 of them per layer
        ref = StorageRef("0", 1)
        name = "model.layers.{}.mlp.up_proj.weight"
        obj = {name.format(i): FakeTensor(ref, 0, (1 << 16, 1 << 16), (0, 0)) for i in range(2)}
        only_bin(folder, obj, {"0": bytes(4)})

    def deflated(folder: Path) -> None:  # 256 MB of zeros deflated to ~250 KB
        numel = 64 << 20
        obj = {"model.embed_tokens.weight": FakeTensor(StorageRef("0", numel), 0, (numel,), (1,))}
        path = only_bin(folder, obj, {})
        with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            with zf.open("archive/data/0", "w") as f:
                for _ in range(256):
                    f.write(bytes(1 << 20))

    def code(folder: Path) -> None:
        only_bin(folder, {"w": Evil(mark)}, {}, pid_ok=False)

    def past_end(folder: Path) -> None:  # a view reaching far past its 16-byte storage
        ref = StorageRef("0", 4)
        only_bin(folder, {"w": FakeTensor(ref, 10**9, (4,), (1,))}, {"0": bytes(16)})

    def not_zip(folder: Path) -> None:
        only_bin(folder, {}, {})
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00." + bytes(100))

    return {
        "bin-views-of-one-storage": views,
        "bin-stride-0": stride0,
        "bin-deflated": deflated,
        "bin-code": code,
        "bin-offset-past-end": past_end,
        "bin-not-zip": not_zip,
    }


def gguf_kinds() -> dict[str, Callable[[Path, Path], None]]:
    """GGUF files: (good file, where to write the hostile one)."""
    import gguf
    from test_hostile_gguf import TOK, V, _rewrite

    def count(key: str, value: int) -> Callable[[Path, Path], None]:
        def write(good: Path, out: Path) -> None:
            data = bytearray(good.read_bytes())
            name = key.encode()
            i = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
            data[i + 8 : i + 16] = struct.pack("<Q", value)  # after (ARRAY, item type)
            out.write_bytes(data)

        return write

    def header(offset: int, value: int) -> Callable[[Path, Path], None]:
        def write(good: Path, out: Path) -> None:
            data = bytearray(good.read_bytes())
            data[offset : offset + 8] = struct.pack("<Q", value)
            out.write_bytes(data)

        return write

    def bad_token(good: Path, out: Path) -> None:
        tokens = [t.encode() for t in gguf.GGUFReader(good).fields[TOK + "tokens"].contents()]
        tokens[5] = b"\xff\xfeab"
        _rewrite(good, out, {TOK + "tokens": (tokens, V.ARRAY, V.STRING)})

    def blocks(good: Path, out: Path) -> None:
        _rewrite(good, out, {"llama.block_count": (100_000, V.UINT32, None)})

    return {
        "gguf-token-not-utf8": bad_token,
        "gguf-name-not-utf8": lambda g, o: _rewrite(
            g, o, {"general.name": (b"caf\xe9", V.STRING, None)}
        ),
        "gguf-2^60-tokens": count(TOK + "tokens", 1 << 60),
        "gguf-2^60-token-types": count(TOK + "token_type", 1 << 60),
        "gguf-2^60-tensors": header(8, 1 << 60),
        "gguf-2^60-keys": header(16, 1 << 60),
        "gguf-100k-blocks": blocks,
        "gguf-truncated": lambda g, o: o.write_bytes(g.read_bytes()[: g.stat().st_size // 3]),
        "gguf-head-count-0": lambda g, o: _rewrite(
            g, o, {"llama.attention.head_count": (0, V.UINT32, None)}
        ),
    }


def adapter_kinds() -> dict[str, Callable[[Path], None]]:
    """Corruptions of an adapter folder (mlx-lm layout or PEFT)."""

    def weights(d: Path) -> Path:
        return next(d.glob("*.safetensors"))

    kinds: dict[str, Callable[[Path], None]] = {}
    for name, content in _json_cases().items():
        kinds[f"adapter-config-{name}"] = lambda d, c=content: (
            d / "adapter_config.json"
        ).write_bytes(c)
        kinds[f"adapter-header-{name}"] = lambda d, c=content: _with_header(weights(d), c)
    kinds |= {
        "adapter-num-layers-1e7": lambda d: _set_json(d / "adapter_config.json", num_layers=10**7),
        "adapter-rank-1e9": lambda d: _set_rank(d, 10**9),
        "adapter-weights-missing": lambda d: weights(d).unlink(),
        "adapter-weights-truncated": lambda d: _truncate(weights(d), 0.4),
        "adapter-config-fifo": lambda d: _fifo(d / "adapter_config.json"),
    }
    return kinds


def _set_rank(d: Path, rank: int) -> None:
    config = json.loads((d / "adapter_config.json").read_text())
    if "lora_parameters" in config:
        config["lora_parameters"]["rank"] = rank
    else:
        config["r"] = rank
    (d / "adapter_config.json").write_text(json.dumps(config))


RECIPE = """\
model:
  path: {model}
  dtype: float32
data:
  train: train.jsonl
  max_length: 64
method:
  type: lora
  rank: 4
training:
  steps: 2
  batch_size: 2
output: out
"""


def recipe_kinds() -> dict[str, Callable[[Path], list]]:
    """Hostile recipes, overrides and data for `run`/`recipes validate`: name → (folder →
    extra arguments after the recipe path). The recipe is `recipe.yaml`, its data `train.jsonl`."""
    from test_hostile_inputs import BOMB, BOMB_FLOW, LAUGHS, ROWS, SELF_REFERENCE

    def edit(text: Callable[[str], str]) -> Callable[[Path], list]:
        def write(d: Path) -> list:
            path = d / "recipe.yaml"
            path.write_text(text(path.read_text()))
            return []

        return write

    def data(line: bytes) -> Callable[[Path], list]:
        def write(d: Path) -> list:
            good = json.dumps({"text": "hello there"}).encode()
            (d / "train.jsonl").write_bytes(b"\n".join([good, line, good]) + b"\n")
            return []

        return write

    def special(name: str, make: Callable[[Path], None]) -> Callable[[Path], list]:
        return lambda d: [make(d / name)] and []

    kinds = {
        "yaml-billion-laughs": edit(lambda t: t.replace("training:\n", BOMB, 1)),
        "yaml-self-reference": edit(lambda t: t.replace("training:\n", SELF_REFERENCE, 1)),
        "yaml-rules-style-bomb": edit(
            lambda t: t + "extra:\n" + "".join(f"  {x}\n" for x in LAUGHS)
        ),
        "yaml-not-utf8": lambda d: [(d / "recipe.yaml").write_bytes(b"model: \xff\xfe\n")] and [],
        "yaml-deep": lambda d: [(d / "recipe.yaml").write_text("[" * 100_000)] and [],
        "override-bomb": lambda d: [f"training.optimizer_args={BOMB_FLOW}"],
        "override-deep": lambda d: ["training.optimizer_args=" + "[" * 50_000],
        "recipe-fifo": special("recipe.yaml", _fifo),
        "recipe-dev-zero": special("recipe.yaml", _dev_zero),
        "data-fifo": special("train.jsonl", _fifo),
        "data-dev-zero": special("train.jsonl", _dev_zero),
        "data-surrogate": data(b'{"text": "a\\ud800b"}'),
        "steps-huge": lambda d: ["training.steps=" + "9" * 5000],
        "model-config-deep": lambda d: [f"model.path={d / 'model'}"],
    }
    kinds |= {f"data-{name}": data(line) for name, line in ROWS.items()}
    return kinds


def data_kinds() -> dict[str, Callable[[Path], None]]:
    """Hostile data files at `folder/in.jsonl` (or .csv), for `batch --input` and `eval --data`."""
    from test_hostile_inputs import ROWS

    def jsonl(line: bytes) -> Callable[[Path], None]:
        good = json.dumps({"prompt": "The film was great.", "completion": "good"}).encode()
        return lambda p: p.write_bytes(b"\n".join([good, line, good]) + b"\n")

    kinds = {f"line-{name}": jsonl(line) for name, line in ROWS.items()}
    kinds |= {
        "line-surrogate": jsonl(b'{"prompt": "a\\ud800b", "completion": "x"}'),
        "line-nan-id": jsonl(b'{"id": NaN, "prompt": "x", "completion": "y"}'),
        "input-fifo": _fifo,
        "input-dev-zero": _dev_zero,
        "csv-not-utf8": lambda p: p.with_suffix(".csv").write_bytes(b"prompt\n\xff\xfe\n"),
        "csv-long-field": lambda p: p.with_suffix(".csv").write_bytes(
            b'prompt\n"' + b"x" * (200 << 10) + b"\n"
        ),
    }
    return kinds


# --- what each error line must say -----------------------------------------------------------

# The words of a data line's error, by kind of line (test_hostile_inputs.ROWS).
ROW_SAYS = {
    "not-utf8": "not UTF-8",
    "syntax": "not valid JSON",
    "huge-int": "more than 4300 digits",
    "deep": "nested too deeply",
    "wrong-type": "expected a JSON object, got list",
}


def says_by_kind() -> dict[str, str]:
    """kind → a regex the one `error:` line must match: the file at fault (or the key, flag,
    value) and what is wrong with it. Families of kinds share one pattern."""
    from test_hostile_inputs import HOSTILE_JSON

    json_says = {name: re.escape(needle) for name, (_, needle) in HOSTILE_JSON.items()}
    header_says = json_says | {"wrong-type": "not a JSON object"}
    safetensors = r"\.safetensors: not a valid safetensors file \("
    aliases = r"recipe\.yaml:\d+: YAML aliases/anchors are not allowed in recipes"
    says: dict[str, str] = {}
    for name, what in json_says.items():
        says[f"config-{name}"] = rf"/config\.json: .*{what}"
        says[f"index-{name}"] = rf"/model\.safetensors\.index\.json: .*{what}"
        says[f"header-{name}"] = rf"/model{safetensors}.*{header_says[name]}"
        says[f"adapter-config-{name}"] = rf"/adapter_config\.json: .*{what}"
        says[f"adapter-header-{name}"] = rf"/adapters?(_model)?{safetensors}.*{header_says[name]}"
    for name, what in ROW_SAYS.items():
        says[f"line-{name}"] = rf"in\.jsonl:2: .*{what}"
        says[f"data-{name}"] = rf"train\.jsonl:2: .*{what}"
    for kind in ("bin-views-of-one-storage", "bin-stride-0"):
        says[kind] = r"pytorch_model\.bin: its tensors expand to more than \d+ bytes"
    for kind in ("gguf-2^60-tensors", "gguf-2^60-keys"):
        says[kind] = r"m\.gguf: its header claims \d+ tensors and \d+ metadata entries"
    for kind in ("gguf-2^60-tokens", "gguf-2^60-token-types"):
        says[kind] = r"m\.gguf: .*an array claims 1152921504606846976 entries"
    for kind, error in TEMPLATE_ERRORS.items():
        says[kind] = rf"chat template fails on this conversation \({error}"
    says |= {
        # checkpoints
        "header-length-2^62": rf"/model{safetensors}header length 4611686018427387904 runs past",
        "header-length-past-end": rf"/model{safetensors}header length 1000000 runs past",
        "weights-truncated": rf"/model{safetensors}tensor '.*' data .* lies outside",
        "weights-missing": r"/model: no .*safetensors",
        "many-tiny-layers": r"config\.json: num_hidden_layers is 20000 but",
        "layers-1e7": r"config\.json: num_hidden_layers is 10000000 but",
        "hidden-0": r"config\.json: hidden_size is '0'",
        "vocab-1e9": r"config\.json: vocab_size is 1000000000 but",
        "model-type-cache": r"model_type 'cache' is not supported",
        "rope-theta-string": r'config\.json: rope_theta is "fast"',
        "eos-string": r'config\.json: eos_token_id must be .*"</s>"',
        "dtype-unknown": r"/config\.json: dtype is 'Float32', which names no torch dtype",
        "quantization-4": r"config\.json: quantization is '4'",
        "config-fifo": r"/config\.json: is a FIFO",
        "config-dev-zero": r"/config\.json: is a character device",
        "tokenizer-deep": r"/tokenizer\.json: not valid JSON \(nested too deeply",
        "tokenizer-config-huge-int": r"/tokenizer_config\.json: not valid JSON \(.*4300 digits",
        "tokenizer-code": r"auto_map|custom code",
        "tool-parser-bogus": r"tokenizer_config\.json(:|'s) tool_parser_type",
        "bin-deflated": r"pytorch_model\.bin: zip entry 'archive/data/0' is compressed",
        "bin-code": r"pytorch_model\.bin: refusing to load: the pickle asks for posix\.system",
        "bin-offset-past-end": r"pytorch_model\.bin: a tensor in data\.pkl reaches element",
        "bin-not-zip": r"pytorch_model\.bin: this is a bare pickle",
        "gguf-token-not-utf8": r"m\.gguf: a string in its metadata is not UTF-8 \(byte 0xff",
        "gguf-name-not-utf8": r"m\.gguf: a string in its metadata is not UTF-8 \(byte 0xe9",
        "gguf-100k-blocks": r"m\.gguf: llama\.block_count is 100000 but",
        "gguf-truncated": r"m\.gguf: not a readable GGUF file: its metadata ends early",
        "gguf-head-count-0": r"m\.gguf: the GGUF.s llama\.attention\.head_count is .0.",
        # adapters
        "adapter-num-layers-1e7": r"num_layers",
        "adapter-rank-1e9": r"adapter_config\.json: (lora_parameters\.rank|r) is 1000000000 but",
        "adapter-weights-missing": r"/adapter: not an? (PEFT )?adapter folder",
        "adapter-weights-truncated": rf"/adapters?(_model)?{safetensors}tensor .* lies outside",
        "adapter-config-fifo": r"/adapter_config\.json: is a FIFO",
        # recipes, overrides, training data
        "yaml-billion-laughs": aliases,
        "yaml-self-reference": aliases,
        "yaml-rules-style-bomb": aliases,
        "yaml-not-utf8": r"recipe\.yaml: the recipe is not UTF-8",
        "yaml-deep": r"recipe\.yaml: not valid YAML \(nested too deeply",
        "override-bomb": r"override 'training\.optimizer_args=.*': YAML aliases/anchors are not",
        "override-deep": r"override 'training\.optimizer_args=\[+…': not valid YAML",
        "recipe-fifo": r"/recipe\.yaml: is a FIFO",
        "recipe-dev-zero": r"/recipe\.yaml: is a character device",
        "data-fifo": r"/train\.jsonl: is a FIFO",
        "data-dev-zero": r"/train\.jsonl: is a character device",
        "data-surrogate": r"train\.jsonl:2: .*lone surrogate U\+D800",
        "steps-huge": r"training\.steps",
        "model-config-deep": r"/model/config\.json: not valid JSON \(nested too deeply",
        # data files for batch and eval
        "line-surrogate": r"in\.jsonl:2: .*lone surrogate U\+D800",
        "line-nan-id": r"in\.jsonl:2: id is NaN",
        "input-fifo": r"/in\.jsonl: is a FIFO",
        "input-dev-zero": r"/in\.jsonl: is a character device",
        "csv-not-utf8": r"in\.csv(:2)?: .*not UTF-8",
        "csv-long-field": r"in\.csv:2: .*field larger than field limit",
    }
    return says


# --- the corpus ----------------------------------------------------------------------------------


def command(verb: str, b: Base, d: Path, **given: Path | str) -> list:
    """The command line that hands `verb` its inputs: the base's model, adapter, PEFT adapter
    and the corpus's data file unless `given`; its output in the case folder `d`."""
    model = given.get("model", b.mlx)
    adapter = given.get("adapter", b.adapter)
    data = given.get("data", d.parent / "data.jsonl")
    out = given.get("out", d / (BATCH_OUT if verb == "batch" else "out"))
    gen = ["generate", model, "-p", "hi", "--max-tokens", "2"]
    gguf = ["export", "gguf", model, out]
    rows = ["--input", data, "--output", out, "--field", "prompt", "--max-tokens", "2"]
    return {
        "generate": gen,
        "generate --adapter": [*gen, "--adapter", adapter],
        "chat": ["chat", model, "--max-tokens", "2"],
        "batch": ["batch", model, *rows],
        "eval": ["eval", model, "--data", data, "--task", "perplexity", "--output", out],
        "quantize": ["quantize", model, out, "--no-eval"],
        "convert": ["convert", model, out],
        "verify": ["convert", model, out, "--verify"],
        "info": ["info", model],
        "export gguf": gguf,
        "export gguf --adapter": [*gguf, "--adapter", adapter],
        "export gguf --adapter-only": [*gguf, "--adapter", adapter, "--adapter-only"],
        "export ollama": ["export", "ollama", model, out],
        "export peft": ["export", "peft", adapter, out],
        "fuse": ["fuse", model, adapter, out],
        "import peft": ["import", "peft", given.get("peft", b.peft), out, "--model", model],
    }[verb]


def _data_line(prompt: str = "The film was great.") -> str:
    return json.dumps({"prompt": prompt, "completion": "good"}) + "\n"


class Corpus:
    """Writes cases under `root`, each in its own folder; `cases()` yields them."""

    def __init__(self, base: Base, root: Path) -> None:
        self.base, self.root = base, root
        self.marks = root / "marks"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def _folder(self, verb: str, kind: str) -> Path:
        self.n += 1
        d = self.root / f"{self.n:04d}-{verb.replace(' ', '_').replace('-', '')}-{kind}"
        d.mkdir(parents=True)
        return d

    def cases(
        self,
        ci_only: bool = False,
        sample: int | None = None,
        seed: int = 0,
        kinds: str | None = None,
    ) -> list[Case]:
        """The whole corpus, its CI subset (a few cases per verb and kind of input), a seeded
        sample of `sample` cases, or the kinds matching the regular expression `kinds`; only the
        chosen cases' folders are written."""
        (self.root / "data.jsonl").write_text(_data_line())
        says = says_by_kind()
        everything = list(self._all())
        for case in everything:
            case.says = case.says or says.get(case.kind)
        unsaid = sorted({c.kind for c in everything if c.says is None and 1 in c.expect})
        assert not unsaid, f"no expected error message for {unsaid}"
        chosen = [c for c in everything if c.ci or not ci_only]
        if kinds is not None:
            chosen = [c for c in chosen if re.search(kinds, c.kind)]
        if sample is not None and sample < len(chosen):
            chosen = random.Random(seed).sample(chosen, sample)
        for case in chosen:
            case.dir = self._folder(case.verb, case.kind)
            case.args = [str(a) if isinstance(a, Path) else a for a in case.make(case.dir)]
        return chosen

    def _model_copy(self, d: Path, src: Path, kind: Callable[[Path], None]) -> Path:
        model = d / "model"
        shutil.copytree(src, model)
        kind(model)
        return model

    def _with_model(self, verb: str, src: Path, corrupt: Callable[[Path], None]) -> Callable:
        """A case maker: `verb` on a copy of the checkpoint `src` that `corrupt` changed."""
        return lambda d: command(verb, self.base, d, model=self._model_copy(d, src, corrupt))

    def _all(self) -> Iterator[Case]:
        b = self.base
        models = model_kinds()
        ci_models = {
            "convert": {
                "config-deep",
                "header-huge-int",
                "many-tiny-layers",
                "config-fifo",
                "tool-parser-bogus",
            },
            "generate": {"tokenizer-code", "header-length-2^62", "quantization-4"},
            "verify": {"header-deep", "tokenizer-deep"},
            "quantize": {"tool-parser-bogus"},
            "export gguf": {
                "many-tiny-layers",
                "layers-1e7",
                "quantization-4",
                "tool-parser-bogus",
            },
            "batch": {"config-dev-zero"},
            "info": {"header-deep"},
        }
        outputs = {"batch": BATCH_FILES}
        # Checkpoints: HF sources for convert/verify/info, MLX ones for the rest.
        for verb in ["convert", "verify", "info", "quantize", *MODEL_VERBS[:-3], "export gguf"]:
            src = b.hf if verb in ("convert", "verify", "info") else b.mlx
            for kind, corrupt in models.items():
                if kind.startswith("index-") and verb not in ("convert", "quantize", "generate"):
                    continue
                # Harmless by design: info describes what it can (it builds no model); MLX
                # checkpoints are loaded without their index; convert drops auto_map (the
                # code must still never run).
                harmless = verb == "info" and not kind.startswith(("config-", "header-"))
                harmless |= kind.startswith("index-") and verb not in ("convert", "quantize")
                # convert and quantize --no-eval copy tokenizer files without running them.
                harmless |= kind.startswith("tokenizer") and verb in ("convert", "quantize")
                harmless |= kind == "dtype-unknown" and verb in ("convert", "quantize")
                expect = (0, 1) if harmless else (1,)
                if verb == "export gguf" and kind == "tool-parser-bogus":
                    # An mlx-lm-only key no GGUF field carries: the GGUF is right without it,
                    # so the export goes on and notes it (convert and quantize refuse: their
                    # output would fail to load).
                    expect = (0,)
                yield Case(
                    verb,
                    kind,
                    make=self._with_model(verb, src, corrupt),
                    outputs=outputs.get(verb, ("out",)),
                    expect=expect,
                    stdin=b"hi\n/quit\n",
                    # --verify checks after writing: a failed check keeps the output.
                    kept=("out",) if verb == "verify" else BATCH_KEPT,
                    ci=kind in ci_models.get(verb, ()),
                )
        ci_pairs = {
            ("fuse", "layers-1e7"),
            ("import peft", "config-deep"),
            ("import peft", "layers-1e7"),
            ("import peft", "many-tiny-layers"),
        }
        for verb in ["fuse", "import peft", "export ollama"]:
            for kind in ["config-deep", "header-deep", "layers-1e7", "many-tiny-layers"]:
                yield Case(
                    verb,
                    kind,
                    make=self._with_model(verb, b.mlx, models[kind]),
                    ci=(verb, kind) in ci_pairs,
                )
        # Chat templates that fail at run time.
        for verb in ["generate", "chat", "batch", "eval", "export ollama"]:
            for kind, source in TEMPLATE_KINDS.items():
                yield Case(
                    verb,
                    kind,
                    make=self._with_model(verb, b.mlx, lambda m, s=source: _template(m, s)),
                    outputs=outputs.get(verb, ("out",)),
                    stdin=b"hi\n/quit\n",
                    expect=(0,) if verb == "chat" else (1,),  # chat notes it and goes on
                    ci=kind == "template-zero-division" and verb in ("export ollama", "chat"),
                )
        # .bin checkpoints: malicious, amplifying, malformed.
        for verb in ["convert", "verify", "info", "quantize"]:
            for kind, write in bin_kinds(str(self.marks / "bin-code")).items():
                yield Case(
                    verb,
                    kind,
                    make=self._with_model(verb, b.hf, write),
                    expect=(0, 1) if verb == "info" else (1,),  # info reads no tensor data
                    ci=verb == "convert" or (verb == "info" and kind == "bin-code"),
                )
        # GGUF files.
        for kind, write in gguf_kinds().items():

            def gguf(d: Path, w=write) -> list:
                w(b.gguf, d / "m.gguf")
                return command("convert", b, d, model=d / "m.gguf")

            ci = kind in ("gguf-2^60-token-types", "gguf-token-not-utf8", "gguf-100k-blocks")
            yield Case("convert", kind, make=gguf, ci=ci)
        # Adapters.
        ci_pairs = {
            ("adapter-config-deep", "fuse"),
            ("adapter-header-deep", "export peft"),
            ("adapter-rank-1e9", "import peft"),
            ("adapter-rank-1e9", "export gguf --adapter"),  # full run: it exported
        }
        for kind, corrupt in adapter_kinds().items():
            for verb in [*ADAPTER_VERBS, "export gguf --adapter-only"]:

                def adapter(d, v=verb, k=corrupt) -> list:
                    a = d / "adapter"
                    shutil.copytree(b.peft if v == "import peft" else b.adapter, a)
                    k(a)
                    return command(v, b, d, adapter=a, peft=a)

                yield Case(
                    verb.split(" --")[0],
                    kind,
                    make=adapter,
                    expect=(0, 1) if kind == "adapter-num-layers-1e7" else (1,),  # metadata only
                    ci=(kind, verb) in ci_pairs,
                )
        # Recipes, overrides and training data.
        for kind, write in recipe_kinds().items():
            for verb in ["recipes validate", "run"]:

                def recipe(d, w=write, v=verb, k=kind) -> list:
                    (d / "train.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
                    model = b.mlx
                    if k == "model-config-deep":
                        model = self._model_copy(d, b.mlx, models["config-deep"])
                    (d / "recipe.yaml").write_text(RECIPE.format(model=model))
                    extra = w(d)
                    return [*v.split(), d / "recipe.yaml", *extra]

                ci = kind in ("yaml-billion-laughs", "recipe-fifo", "override-bomb")
                ci = verb == "run" if kind == "data-surrogate" else ci and verb != "run"
                # `run` writes its run folder (the resolved recipe) before reading the data:
                # the corrected re-run continues in it.
                yield Case(verb, kind, make=recipe, kept=("out",), ci=ci)

        # Data files for batch and eval.
        ci_pairs = {
            ("batch", "input-fifo"),
            ("batch", "line-surrogate"),
            ("eval", "line-deep"),
            ("eval", "line-nan-id"),
            ("batch", "line-nan-id"),
        }
        for kind, write in data_kinds().items():
            for verb in ["batch", "eval"]:

                def rows(d, w=write, v=verb) -> list:
                    path = d / "in.jsonl"
                    w(path)
                    path = path if os.path.lexists(path) else path.with_suffix(".csv")
                    return command(v, b, d, data=path)

                # eval carries no field of a row into its output, only scores (NaN never reaches
                # it) and scores the row right: an "id": NaN is harmless there. batch keys its
                # records (and resume) by id, so it refuses that record.
                harmless = verb == "eval" and kind == "line-nan-id"
                yield Case(
                    verb,
                    kind,
                    make=rows,
                    outputs=outputs.get(verb, ("out",)),
                    ci=(verb, kind) in ci_pairs,
                    expect=(0,) if harmless else (1,),
                )

        yield from self._flags()
        yield from self._outputs()

    def _flags(self) -> Iterator[Case]:
        """Hostile flag values: kind → (verb, command line, what the error line says). In the
        command lines OUT, DATA, RULES, FIFO and RECIPE name files of the case's folder."""
        b = self.base
        rules = "\n".join(__import__("test_hostile_inputs").LAUGHS)
        gen = ["generate", b.mlx, "-p", "hi", "--max-tokens", "2"]
        quantize = ["quantize", b.mlx, "OUT"]
        batch = ["batch", b.mlx, "--input", "DATA", "--output", "OUT"]
        evaluate = ["eval", b.mlx, "--data", "DATA", "--task"]
        invalid = "Invalid value for '{}'"
        flags = {
            "seed-negative": ("generate", [*gen, "--seed", "-1"], invalid.format("--seed")),
            "seed-2^64": ("generate", [*gen, "--seed", str(2**64)], invalid.format("--seed")),
            "temp-nan": ("generate", [*gen, "--temp", "nan"], "--temp"),
            "top-p-2": ("generate", [*gen, "--top-p", "2"], "--top-p"),
            "prompt-not-utf8": ("generate", ["generate", b.mlx, "-p", b"caf\xe9"], "--prompt"),
            "stop-not-utf8": ("generate", [*gen, "--stop", b"\xff"], "--stop"),
            "max-tokens-huge": ("generate", [*gen[:-1], "9" * 5000], "--max-tokens"),
            "system-not-utf8": ("chat", ["chat", b.mlx, "--system", b"\xff\xfe"], "--system"),
            "bits-0": ("quantize", [*quantize, "--bits", "0"], "--bits"),
            "rule-bits-99": ("quantize", [*quantize, "--rule", "mlp=99", "--no-eval"], "99"),
            "rule-bad-regex": (
                "quantize",
                [*quantize, "--rule", "(=4", "--no-eval"],
                r"rule pattern '\(' is not a regular expression",
            ),
            "target-bpw-nan": ("quantize", [*quantize, "--target-bpw", "nan"], "--target-bpw"),
            "rules-bomb": (
                "quantize",
                [*quantize, "--rules", "RULES"],
                r"rules\.yaml:\d+: YAML aliases/anchors are not allowed in rules",
            ),
            "calib-dev-zero": (
                "quantize",
                [*quantize, "--calib", "/dev/zero"],
                r"/dev/zero: is a character device",
            ),
            "calib-fifo": ("quantize", [*quantize, "--calib", "FIFO"], r"/fifo: is a FIFO"),
            "shard-size-negative": (
                "convert",
                ["convert", b.hf, "OUT", "--shard-size", "-1GB"],
                "cannot read size '-1GB'",
            ),
            "shard-size-text": (
                "convert",
                ["convert", b.hf, "OUT", "--shard-size", "lots"],
                "cannot read size 'lots'",
            ),
            "source-fifo": ("convert", ["convert", "FIFO", "OUT"], r"/fifo\b"),
            "source-dev-zero": ("convert", ["convert", "/dev/zero", "OUT"], r"/dev/zero\b"),
            "batch-size-0": ("batch", [*batch, "--batch-size", "0"], "--batch-size"),
            "template-nested-spec": (
                "batch",
                [*batch, "--template", "{prompt:{completion}}"],
                r"template: \{prompt:\{completion\}\} asks for a width or precision",
            ),
            "template-attribute": (
                "batch",
                [*batch, "--template", "{prompt.__class__}"],
                r"\{prompt\.__class__\}",
            ),
            "labels-empty": ("eval", [*evaluate, "classify", "--labels", ","], "label ''"),
            "limit-0": ("eval", [*evaluate, "perplexity", "--limit", "0"], "--limit"),
            "type-bogus": (
                "export gguf",
                ["export", "gguf", b.mlx, "OUT", "--type", "q3_k"],
                "--type|q3_k",
            ),
            "resume-nothing": ("run", ["run", "RECIPE", "--resume"], "--resume"),
        }
        ci = {"seed-2^64", "prompt-not-utf8", "rules-bomb", "calib-fifo", "template-nested-spec"}
        for kind, (verb, args, says) in flags.items():

            def make(d, args=args, v=verb) -> list:
                (d / "data.jsonl").write_text(_data_line())
                (d / "rules.yaml").write_text(rules)
                os.mkfifo(d / "fifo")
                (d / "train.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
                (d / "recipe.yaml").write_text(RECIPE.format(model=b.mlx))
                names = {"OUT": BATCH_OUT if v == "batch" else "out", "DATA": "data.jsonl"}
                names |= {"RULES": "rules.yaml", "FIFO": "fifo", "RECIPE": "recipe.yaml"}
                return [str(d / names[a]) if a in names else a for a in args]

            yield Case(
                verb,
                f"flag-{kind}",
                make=make,
                outputs=("out", *BATCH_FILES),
                stdin=b"hi\n/quit\n",
                ci=kind in ci,
                says=says,
            )

    def _outputs(self) -> Iterator[Case]:
        """Outputs that must not be replaced: a FIFO, a device, a file inside a file."""
        b = self.base
        kinds = {
            "out-fifo": lambda d, n: [_fifo(d / n), d / n][1],
            "out-dev-null": lambda d, n: [(d / n).symlink_to("/dev/null"), d / n][1],
            "out-under-a-file": lambda d, n: [(d / "file").write_text("x"), d / "file" / n][1],
        }
        ci = ("convert", "eval", "export gguf")
        for verb in OUTPUT_VERBS:
            name = BATCH_OUT if verb == "batch" else "out"
            given = {"model": b.hf} if verb == "convert" else {}
            for kind, make in kinds.items():
                says = rf"/{re.escape(name)} exists and is not a regular file or folder"
                if kind == "out-under-a-file":
                    says = rf"cannot write \S*/file/{re.escape(name)}: \S*/file cannot be made a"
                for force in ([], ["--force"]):
                    yield Case(
                        verb,
                        kind + ("-force" if force else ""),
                        make=lambda d, v=verb, m=make, n=name, f=force, g=given: [
                            *command(v, b, d, out=m(d, n), **g),
                            *f,
                        ],
                        outputs=(),
                        ci=bool(force) and kind == "out-fifo" and verb in ci,
                        says=says,
                    )


# --- running a case ------------------------------------------------------------------------------


def cli_command() -> list[str]:
    """The installed `mlxlocal` script beside this Python, as a user runs it."""
    script = Path(sys.executable).parent / "mlxlocal"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlxlocal.cli"]


def _snapshot(folder: Path) -> dict[str, tuple]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            found[str(path.relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def _leftovers(folder: Path) -> list[str]:
    return [
        str(p.relative_to(folder))
        for p in folder.rglob(".*")
        if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")
    ]


# Runs one case's command from a small fresh process and writes "exit-code peak-RSS" to argv[1].
# Linux copies the parent's memory high-water mark into a forked child and keeps it across
# exec, so a case started by the runner itself (torch, mlx and the base models loaded: ~400 MB)
# would read at least the runner's size; started from here it reads its own (floor ~15 MB).
_MEASURE = """
import os, resource, subprocess, sys
out, limit = sys.argv[1], int(sys.argv[2])
try:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
except (OSError, ValueError):
    pass  # not Linux: the budget is still checked
proc = subprocess.Popen(sys.argv[3:])
_, status, usage = os.wait4(proc.pid, 0)
with open(out, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_case(case: Case, cli: list[str], logs: Path, timeout: float = TIMEOUT_S) -> Outcome:
    """Run one case in a fresh CLI process and check what it did."""
    d = case.dir
    before = _snapshot(d)
    started = time.monotonic()
    tmp = logs / f"{d.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLXLOCAL_TEST_MARK": str(Path(d).parent / "marks" / d.name),
        "PYTHONUNBUFFERED": "1",
        # PyTorch (the transformers reference of `--verify`) keeps its compile cache in
        # TMPDIR/torchinductor_USER: torch's own cache, not an output of ours.
        "TORCHINDUCTOR_CACHE_DIR": str(logs / "torchinductor"),
    }
    out_path, in_path = logs / f"{d.name}.out", logs / f"{d.name}.in"
    measured = logs / f"{d.name}.rss"
    in_path.write_bytes(case.stdin)
    args = [a if isinstance(a, bytes) else str(a) for a in case.args]
    with open(out_path, "wb") as out, open(in_path, "rb") as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _MEASURE, str(measured), str(AS_LIMIT), *cli, *args],
            cwd=d,
            env=env,
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
    rc, maxrss = os.waitstatus_to_exitcode(status), usage.ru_maxrss  # killed: no record
    if measured.exists():
        rc, maxrss = map(int, measured.read_text().split())
    peak_mb = maxrss // ((1 << 20) if sys.platform == "darwin" else (1 << 10))
    output = out_path.read_bytes().decode(errors="replace")
    problems = []
    if rc not in case.expect:
        problems.append(f"exit {rc}, expected {case.expect}")
    if "Traceback" in output:
        problems.append("traceback")
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    if rc == 1 and len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    if case.says and len(errors) == 1 and not re.search(case.says, errors[0]):
        problems.append(f"vague: the error line does not say /{case.says}/")
    after = _snapshot(d)
    # A failed batch keeps what it wrote so far, for its re-run to continue.
    allowed = case.outputs if rc == 0 else case.kept
    created = [p for p in set(after) - set(before) if p.split("/")[0] not in allowed]
    if created:
        problems.append(f"created {sorted(created)[:3]}")
    changed = [p for p in before if p in after and after[p][:2] != before[p][:2]]
    changed += [p for p in before if p not in after]
    if changed:
        problems.append(f"changed or removed input {sorted(changed)[:3]}")
    if left := _leftovers(d):
        problems.append(f"leftovers {left[:3]}")
    if stray := [p for p in tmp.iterdir() if p.name != "mlx"]:  # MLX's CPU kernel cache
        problems.append(f"left in TMPDIR {[p.name for p in stray[:3]]}")
    if peak_mb >= RSS_BUDGET_MB:
        problems.append(f"peak RSS {peak_mb} MB")
    marks = Path(d).parent / "marks"
    if marks.exists() and list(marks.iterdir()):
        problems.append(f"CODE RAN: {[p.name for p in marks.iterdir()]}")
    return Outcome(case, rc, output, peak_mb, problems, time.monotonic() - started)


def run_cases(cases: list[Case], jobs: int, logs: Path, report=None) -> list[Outcome]:
    """Every case, `jobs` at a time (each case owns its folder, so they do not interfere)."""
    cli = cli_command()
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_case, c, cli, logs) for c in cases]
        outcomes = []
        for f in futures:
            outcomes.append(f.result())
            if report:
                report(outcomes[-1])
        return outcomes


def summary(outcomes: list[Outcome]) -> str:
    per_verb = Counter(o.case.verb for o in outcomes)
    lines = ["corpus per verb: " + ", ".join(f"{v} {n}" for v, n in sorted(per_verb.items()))]
    count = lambda word: sum(any(word in p for p in o.problems) for o in outcomes)  # noqa: E731
    worst = max(outcomes, key=lambda o: o.peak_mb)
    lines.append(
        f"cases {len(outcomes)}, tracebacks {count('traceback')}, code executions "
        f"{count('CODE RAN')}, leftovers {count('leftovers') + count('TMPDIR')}, created "
        f"{count('created')}, vague {count('vague')}, "
        f"failing {sum(bool(o.problems) for o in outcomes)}"
    )
    lines.append(
        f"largest peak RSS {worst.peak_mb} MB ({worst.case.verb} {worst.case.kind}); "
        f"budget {RSS_BUDGET_MB} MB; {sum(o.seconds for o in outcomes) / 60:.1f} min in cases"
    )
    return "\n".join(lines)


# --- random mutations (make fuzz) ----------------------------------------------------------------

INTERESTING = [0, 0xFF, 0x7F, 0x80, ord('"'), ord("{"), ord("["), ord("9"), ord("-"), ord("\\")]


def mutate(data: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    """`data` with 1-4 random edits in [lo, hi): byte flips, interesting bytes, a cut, a copy."""
    b = bytearray(data)
    hi = min(hi, len(b))
    for _ in range(rng.randint(1, 4)):
        if hi <= lo:
            break
        i = rng.randrange(lo, hi)
        op = rng.random()
        if op < 0.35:
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.65:
            b[i] = rng.choice(INTERESTING)
        elif op < 0.8:
            j = min(hi, i + rng.randint(1, 64))
            b[i:i] = b[i:j] * rng.randint(1, 50)
            hi = min(len(b), hi + (j - i))
        elif op < 0.9:
            del b[i : min(hi, i + rng.randint(1, 16))]
            hi = min(hi, len(b))
        else:
            return bytes(b[:i])  # truncated
    return bytes(b)


def _safetensors_header(path: Path) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 0, 8 + n


def _gguf_header(path: Path) -> tuple[int, int]:
    import gguf

    reader = gguf.GGUFReader(path)
    return 0, min(int(t.data_offset) for t in reader.tensors)


def _whole(path: Path) -> tuple[int, int]:
    return 0, path.stat().st_size


def mutation_targets(base: Base, root: Path) -> list[tuple[str, str, Callable]]:
    """(verb, file, (folder, mutated bytes writer) → args): what the mutations are applied to.
    Only the regions a reader parses are mutated: a flipped bit in tensor data is just another
    number."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.jsonl").write_text(_data_line())  # what `command` gives eval

    def model(verb: str, src: Path, name: str, region) -> tuple:
        def args(d: Path, rng: random.Random) -> list:
            m = d / "model"
            shutil.copytree(src, m)
            f = m / name
            lo, hi = region(f)
            f.write_bytes(mutate(f.read_bytes(), lo, hi, rng))
            return command(verb, base, d, model=m)

        return verb, name, args

    def gguf_file(d: Path, rng: random.Random) -> list:
        lo, hi = _gguf_header(base.gguf)
        (d / "m.gguf").write_bytes(mutate(base.gguf.read_bytes(), lo, hi, rng))
        return command("convert", base, d, model=d / "m.gguf")

    def adapter(verb: str, name: str, src: Path = base.adapter) -> tuple:
        def args(d: Path, rng: random.Random) -> list:
            a = d / "adapter"
            shutil.copytree(src, a)
            f = a / name
            lo, hi = (_safetensors_header if name.endswith(".safetensors") else _whole)(f)
            f.write_bytes(mutate(f.read_bytes(), lo, hi, rng))
            return command(verb, base, d, adapter=a, peft=a)

        return verb, name, args

    def recipe(verb: str) -> tuple:
        def args(d: Path, rng: random.Random) -> list:
            (d / "train.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
            text = RECIPE.format(model=base.mlx).encode()
            (d / "recipe.yaml").write_bytes(mutate(text, 0, len(text), rng))
            return [*verb.split(), d / "recipe.yaml"]

        return verb, "recipe.yaml", args

    def rows(verb: str) -> tuple:
        def args(d: Path, rng: random.Random) -> list:
            text = "".join(_data_line(f"Review {i}") for i in range(3)).encode()
            (d / "in.jsonl").write_bytes(mutate(text, 0, len(text), rng))
            return command(verb, base, d, data=d / "in.jsonl")

        return verb, "in.jsonl", args

    def bin_pickle(d: Path, rng: random.Random) -> list:
        m = d / "model"
        shutil.copytree(base.hf, m)
        for f in m.glob("model*.safetensors*"):
            f.unlink()
        import torch
        from safetensors.torch import load_file

        state = load_file(base.hf / "model.safetensors")
        torch.save(state, m / "pytorch_model.bin")
        with zipfile.ZipFile(m / "pytorch_model.bin") as zf:
            entries = {i: zf.read(i) for i in zf.infolist()}
        with zipfile.ZipFile(m / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as zf:
            for info, content in entries.items():
                if info.filename.endswith("data.pkl"):
                    content = mutate(content, 0, len(content), rng)
                zf.writestr(info.filename, content)
        return command("convert", base, d, model=m)

    targets = [
        model("convert", base.hf, "model.safetensors", _safetensors_header),
        model("info", base.hf, "model.safetensors", _safetensors_header),
        model("convert", base.hf, "config.json", _whole),
        model("info", base.hf, "config.json", _whole),
        model("convert", base.hf, "tokenizer_config.json", _whole),
        model("generate", base.mlx, "model.safetensors", _safetensors_header),
        model("generate", base.mlx, "config.json", _whole),
        model("generate", base.mlx, "tokenizer_config.json", _whole),
        model("generate", base.mlx, "tokenizer.json", _whole),
        model("quantize", base.mlx, "config.json", _whole),
        model("export gguf", base.mlx, "config.json", _whole),
        model("eval", base.mlx, "tokenizer_config.json", _whole),
        ("convert", "m.gguf", gguf_file),
        ("convert", "pytorch_model.bin", bin_pickle),
        adapter("fuse", "adapter_config.json"),
        adapter("fuse", "adapters.safetensors"),
        adapter("export peft", "adapter_config.json"),
        adapter("import peft", "adapter_config.json", base.peft),
        recipe("recipes validate"),
        rows("batch"),
        rows("eval"),
    ]
    return targets


def mutation_cases(base: Base, root: Path, seed: int, count: int, start: int = 0) -> list[Case]:
    """Mutated cases number `start`..`start + count` of run `seed`: each target in turn, then
    targets drawn at random; case i is the same for the same seed."""
    targets = mutation_targets(base, root)
    cases = []
    for i in range(start, start + count):
        rng = random.Random(f"{seed}-{i}")
        verb, name, make = targets[i] if i < len(targets) else rng.choice(targets)
        d = root / f"m{seed}-{i:05d}-{verb.replace(' ', '_')}-{name}"
        d.mkdir(parents=True)
        args = [str(a) if isinstance(a, Path) else a for a in make(d, rng)]
        cases.append(
            Case(
                verb,
                f"mutated {name}",
                args,
                outputs=("out", *BATCH_FILES),
                expect=(0, 1),
                dir=d,
            )
        )
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 10_000)
    parser.add_argument("--minutes", type=float, default=5.0, help="time for random mutations")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--ci-only", action="store_true", help="only the CI subset of the corpus")
    parser.add_argument("--sample", type=int, help="a seeded sample of this many corpus cases")
    parser.add_argument("--kinds", help="only the corpus cases whose kind matches this regex")
    parser.add_argument("--no-corpus", action="store_true", help="only random mutations")
    parser.add_argument("--keep", type=Path, help="work here and keep the cases")
    parser.add_argument(
        "--each", action="store_true", help="one line per case: exit code, peak RSS, seconds"
    )
    ns = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = ns.keep or Path(tempfile.mkdtemp(prefix="mlxlocal-fuzz-"))
    os.environ["MLXLOCAL_CACHE"] = str(root / "cache")
    print(f"seed {ns.seed}; cases under {root}", flush=True)
    base = build_base(root / "base")
    logs = root / "logs"
    failures: list[Outcome] = []

    def report(o: Outcome) -> None:
        if ns.each:
            print(
                f"case {o.case.dir.name}: exit {o.rc}, peak {o.peak_mb} MB, {o.seconds:.1f} s",
                flush=True,
            )
        if o.problems:
            failures.append(o)
            tail = o.output.strip().splitlines()[-3:]
            print(
                f"FAIL {o.case.dir.name}: {'; '.join(o.problems)}\n    " + "\n    ".join(tail),
                flush=True,
            )

    outcomes: list[Outcome] = []
    if not ns.no_corpus:
        corpus = Corpus(base, root / "corpus")
        cases = corpus.cases(ns.ci_only, ns.sample, ns.seed, ns.kinds)
        print(f"corpus: {len(cases)} cases", flush=True)
        outcomes += run_cases(cases, ns.jobs, logs, report)
        print(summary(outcomes), flush=True)
    deadline = time.monotonic() + ns.minutes * 60
    mutated: list[Outcome] = []
    while time.monotonic() < deadline:
        cases = mutation_cases(base, root / "mutations", ns.seed, 2 * ns.jobs, len(mutated))
        mutated += run_cases(cases, ns.jobs, logs, report)
    if mutated:
        rcs = Counter(o.rc for o in mutated)
        print(f"mutations: {len(mutated)} (exit codes {dict(rcs)})", flush=True)
        print(summary(mutated), flush=True)
    if failures:
        print(f"{len(failures)} failing cases (see above); kept under {root}")
        return 1
    if not ns.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
