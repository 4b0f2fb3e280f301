"""Small hostile files must fail fast with one line and bounded memory, measured in the child.

Each case runs the verb through the CLI in a fresh Python process that waits for it and reports
its peak RSS (`RUSAGE_CHILDREN`), so one case's peak never hides another's. Measured here on the
tiny checkpoints: `info` peaks at ~45 MB, `convert` at ~265 MB (the MLX import floor); the .bin
reader may add its 64 MiB floor budget. Without the checks each case goes past 1 GB (the config
and GGUF cases past many GB).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch_bin_files import FakeTensor, StorageRef, write_checkpoint

from mlxlocal.errors import MlxLocalError
from mlxlocal.gguf_import import convert_gguf
from mlxlocal.info import info

RSS_BUDGET_MB = 400

_MEASURE = """
import json, resource, subprocess, sys
r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=300)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
peak //= 1 << 20 if sys.platform == "darwin" else 1 << 10
print(json.dumps({"rc": r.returncode, "out": r.stdout + r.stderr, "peak_mb": peak}))
"""


def _run(*args: str | Path) -> tuple[int, str, int]:
    """(exit code, stdout + stderr, peak RSS in MB) of `mlxlocal ARGS` in a fresh process."""
    cmd = [sys.executable, "-m", "mlxlocal.cli", *map(str, args)]
    done = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    result = json.loads(done.stdout)
    return result["rc"], result["out"], result["peak_mb"]


def _refused(*args: str | Path, says: str) -> None:
    rc, out, peak = _run(*args)
    assert rc == 1, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], out
    assert peak < RSS_BUDGET_MB, (peak, out)


def _beside_config(src: Path, folder: Path, **config) -> Path:
    """`folder` holding src's config.json (updated with `config`) and tokenizer, no weights."""
    folder.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".json")):
            shutil.copy(f, folder)
    for f in src.glob("*.json"):
        if not f.name.endswith("index.json"):
            shutil.copy(f, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    return folder


@pytest.fixture(scope="module")
def shared_storage_bin(checkpoints, tmp_path_factory) -> Path:
    """A 4 MB pytorch_model.bin of 256 views of one storage: 1 GB once materialised."""
    folder = _beside_config(checkpoints("llama"), tmp_path_factory.mktemp("bin") / "views")
    base = torch.zeros(1 << 20)
    views = {f"model.layers.{i}.mlp.up_proj.weight": base.view(1024, 1024) for i in range(256)}
    torch.save(views, folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").stat().st_size < 5 << 20
    return folder


def test_views_of_one_storage_stop_at_the_bin_budget(shared_storage_bin, tmp_path):
    _refused("convert", shared_storage_bin, tmp_path / "out", says="expand to more than")
    assert not (tmp_path / "out").exists()


def test_info_of_a_bin_reads_no_tensor_data(shared_storage_bin):
    rc, out, peak = _run("info", shared_storage_bin)
    assert rc == 0, out
    assert "268,435,456" in out  # 256 views x 1M parameters, counted from the pickle alone
    assert peak < RSS_BUDGET_MB, peak


def test_deflated_bin_entry_is_refused_before_inflating(checkpoints, tmp_path):
    folder = _beside_config(checkpoints("llama"), tmp_path / "bomb")
    numel = 128 << 20  # 512 MB of float32 zeros, deflated to ~2 MB
    obj = {"model.embed_tokens.weight": FakeTensor(StorageRef("0", numel), 0, (numel,), (1,))}
    path = write_checkpoint(folder / "pytorch_model.bin", obj, {})
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("archive/data/0", "w") as f:
            for _ in range(512):
                f.write(bytes(1 << 20))
    assert path.stat().st_size < 4 << 20
    _refused("convert", folder, tmp_path / "out", says="is compressed")


def test_ten_million_layers_beside_a_tiny_checkpoint(checkpoints, tiny_mlx, tmp_path):
    src = checkpoints("llama")
    folder = _beside_config(src, tmp_path / "deep", num_hidden_layers=10**7)
    for f in src.glob("*.safetensors"):
        shutil.copy(f, folder)
    _refused("convert", folder, tmp_path / "out", says="num_hidden_layers is 10000000")
    mlx = _beside_config(tiny_mlx, tmp_path / "deep-mlx", num_hidden_layers=10**7)
    for f in tiny_mlx.glob("*.safetensors"):
        shutil.copy(f, mlx)
    _refused("generate", mlx, "-p", "hi", says="num_hidden_layers is 10000000")


def _write_gguf(path: Path, empty: str | None = None, **fields) -> Path:
    """A one-block Llama GGUF (written with the gguf package) whose fields `fields` override;
    tensor `empty` gets a zero first dimension."""
    hidden, ff, vocab = 64, 128, 32
    values = {
        "block_count": 1,
        "embedding_length": hidden,
        "feed_forward_length": ff,
        "attention.head_count": 4,
        "attention.head_count_kv": 4,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "context_length": 128,
        **fields,
    }
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in values.items():
        kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else None
        writer.add_key_value(f"llama.{key}", value, kind or gguf.GGUFValueType.UINT32)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        **{f"blk.0.attn_{p}.weight": (hidden, hidden) for p in ("q", "k", "v", "output")},
        **{f"blk.0.ffn_{p}.weight": (ff, hidden) for p in ("gate", "up")},
        "blk.0.ffn_down.weight": (hidden, ff),
    }
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros((0, *shape[1:]) if name == empty else shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_a_hundred_thousand_blocks(tmp_path):
    path = _write_gguf(tmp_path / "deep.gguf", block_count=100_000)
    assert path.stat().st_size < 200_000
    _refused("convert", path, tmp_path / "out", says=f"{path}: llama.block_count is 100000 but")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("offset", [8, 16], ids=["tensors", "keys"])
def test_gguf_header_counts_past_the_file_are_refused_before_reading(tmp_path, offset):
    """Found by the corpus: 2^60 tensors or keys failed deep in numpy ("index 0 is out of
    bounds")."""
    path = _write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = struct.pack("<Q", 1 << 60)
    path.write_bytes(data)
    _refused("convert", path, tmp_path / "out", says=f"{path}: its header claims ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"attention.head_count": 0}, "head_count is '0', not a positive integer"),
        ({"embedding_length": 0}, "embedding_length is '0', not a positive integer"),
        ({"block_count": 1.5}, "block_count is '1.5'"),
    ],
)
def test_gguf_zero_counts_are_one_line(tmp_path, fields, says):
    with pytest.raises(MlxLocalError, match=says) as e:
        convert_gguf(_write_gguf(tmp_path / "bad.gguf", **fields), tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_gguf_tensor_with_a_zero_dimension_is_one_line(tmp_path):
    path = _write_gguf(tmp_path / "empty.gguf", empty="blk.0.attn_q.weight")
    with pytest.raises(MlxLocalError, match=r"attn_q.weight has shape \[64, 0\]") as e:
        convert_gguf(path, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"hidden_size": 0}, "hidden_size is '0', not a positive integer"),
        ({"num_attention_heads": True}, "num_attention_heads is true, not an integer"),
        ({"vocab_size": 10**9}, "vocab_size is 1000000000 but no tensor"),
    ],
)
def test_config_sizes_are_checked_before_building(checkpoints, tmp_path, config, says):
    from mlxlocal import convert

    src = checkpoints("llama")
    folder = _beside_config(src, tmp_path / "bad", **config)
    for f in src.glob("*.safetensors"):
        shutil.copy(f, folder)
    with pytest.raises(MlxLocalError, match=says) as e:
        convert(folder, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("quantization", "says"),
    [
        (4, "quantization is '4', not a block"),
        ({"bits": 0, "group_size": 64}, "quantization.bits is '0'"),
        ({"bits": 4, "group_size": "64"}, "quantization.group_size is '64'"),
        ({"bits": 4, "group_size": 64, "model.layers.0.mlp": {"bits": 99}}, "mlp.bits is '99'"),
    ],
)
def test_bad_quantization_blocks_are_one_line(tiny_mlx, tmp_path, quantization, says):
    folder = tmp_path / "q"
    shutil.copytree(tiny_mlx, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "quantization": quantization}))
    from mlxlocal.export.gguf import export_gguf
    from mlxlocal.models import load

    def gguf(model):  # read config.json through the same check (it once exported as float)
        return export_gguf(model, tmp_path / "m.gguf")

    for verb in (info, load, gguf):
        with pytest.raises(MlxLocalError, match=says) as e:
            verb(folder)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()
