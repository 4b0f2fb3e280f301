"""Conversion sources, outputs and provenance: .bin, shards, Hub cache, atomicity."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import hf_logits, mlx_logits, probe_ids

from mlxlocal import MlxLocalError, convert
from mlxlocal.checkpoint.shards import ShardWriter, parse_size


def _tensors(path):
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return {k: np.array(v.astype(mx.float32)) for k, v in out.items()}


def test_bin_and_safetensors_give_identical_tensors(checkpoints, tmp_path):
    st = convert(checkpoints("qwen2"), tmp_path / "st")
    for shard in (None, "2"):
        src = checkpoints("qwen2", safe=False, shard=shard)
        assert list(src.glob("pytorch_model*.bin")) and not list(src.glob("*.safetensors"))
        bn = convert(src, tmp_path / f"bin{shard}")
        a, b = _tensors(st.out), _tensors(bn.out)
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert not (bn.out / ".staging").exists()


def test_sharded_source_and_sharded_output(checkpoints, tmp_path):
    src = checkpoints("llama", shard="100KB")
    assert len(list(src.glob("model-*.safetensors"))) > 1
    result = convert(src, tmp_path / "out", shard_size="200KB")
    assert len(result.shards) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(result.shards)
    assert index["metadata"]["total_parameters"] == result.parameters
    ids = probe_ids()
    assert np.abs(hf_logits(src, ids) - mlx_logits(tmp_path / "out", ids)).max() <= 1e-4


def test_output_loads_with_mlx_lm_and_generates(checkpoints, tmp_path):
    from mlx_lm import generate, load

    convert(checkpoints("llama"), tmp_path / "out")
    model, tokenizer = load(str(tmp_path / "out"))
    text = generate(model, tokenizer, "The quick brown", max_tokens=8, verbose=False)
    assert isinstance(text, str)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).exists(), name


def test_provenance_block(checkpoints, tmp_path):
    from mlxlocal import __version__
    from mlxlocal.checkpoint.files import file_sha256

    src = checkpoints("llama")
    convert(src, tmp_path / "out")
    prov = json.loads((tmp_path / "out" / "config.json").read_text())["mlxlocal"]
    assert prov["mlxlocal_version"] == __version__
    assert prov["source"] == str(src)
    assert prov["files"]["model.safetensors"] == file_sha256(src / "model.safetensors")
    assert "config.json" in prov["files"]


def test_dtype_cast_keeps_integer_tensors(checkpoints, tmp_path):
    result = convert(checkpoints("llama"), tmp_path / "out", dtype="bfloat16")
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    assert result.bytes == sum(v.nbytes for v in weights.values())


def _fake_hub_cache(root, repo_id, src, commit="a" * 40):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return commit


def test_hub_repo_id_from_cache_offline(checkpoints, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", checkpoints("llama"))
    result = convert("tiny-org/tiny-llama", tmp_path / "out")
    prov = json.loads((result.out / "config.json").read_text())["mlxlocal"]
    assert prov["source"] == "tiny-org/tiny-llama" and prov["revision"] == commit
    with pytest.raises(MlxLocalError, match="not in the Hugging Face cache and HF_HUB_OFFLINE"):
        convert("tiny-org/not-cached", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_hub_download_failure_is_clear(tmp_path, monkeypatch):
    """Online mode with the network blocked: a clear error, no traceback, no socket use."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    import mlxlocal.sources as sources

    def no_download(*args, **kwargs):
        if kwargs.get("local_files_only"):
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        raise OSError("connection refused")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_download)
    with pytest.raises(MlxLocalError, match="download failed"):
        sources.resolve_source("tiny-org/tiny-llama")


def test_shard_writer_writes_the_index_only_after_every_tensor(tmp_path):
    arrays = {"a": mx.arange(4, dtype=mx.float32), "b": mx.ones((2, 2), dtype=mx.bfloat16)}
    with ShardWriter(tmp_path, arrays, 1 << 20, {"total_parameters": 8}) as writer:
        for name, array in arrays.items():
            writer.write(name, array)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert writer.names == ["model.safetensors"] and writer.total_bytes == 24
    assert index["metadata"] == {"total_size": 24, "total_parameters": 8}
    written = mx.load(str(tmp_path / "model.safetensors"))
    assert all(mx.array_equal(written[k], a).item() for k, a in arrays.items())

    for failed in ("short", "raised"):
        out = tmp_path / failed
        out.mkdir()
        with pytest.raises(ValueError if failed == "short" else RuntimeError):
            with ShardWriter(out, arrays, 1 << 20) as writer:
                writer.write("a", arrays["a"])
                if failed == "raised":
                    raise RuntimeError("the caller failed")
        assert not (out / "model.safetensors.index.json").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 2**30
    assert parse_size("500MB") == 500 * 2**20
    assert parse_size("2.5G") == int(2.5 * 2**30)
    assert parse_size(1234) == 1234
    with pytest.raises(MlxLocalError):
        parse_size("lots")
