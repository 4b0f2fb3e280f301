"""`info` reads what a checkpoint is from headers and configs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxlocal import convert, info
from mlxlocal.cli import cli


def _hf_param_count(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).num_parameters()


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_info_of_hf_and_converted(arch, checkpoints, tmp_path):
    src = checkpoints(arch)
    convert(src, tmp_path / "out", dtype="float16")
    hf, mlx = info(src), info(tmp_path / "out")
    assert hf["model_type"] == mlx["model_type"] == arch
    assert hf["parameters"] == mlx["parameters"] == _hf_param_count(src)
    assert hf["format"] == "hf (safetensors)" and mlx["format"] == "mlx"
    assert hf["dtypes"] == {"float32": 1.0} and mlx["dtypes"] == {"float16": 1.0}
    assert mlx["size_bytes"] < hf["size_bytes"]
    assert mlx["context_length"] == 256
    assert mlx["tokenizer"] == "BPE (tokenizer.json)"
    assert mlx["chat_template"] is True
    assert mlx["quantization"] is None


def test_info_of_quantized_model_matches_mlx_lm(checkpoints, tmp_path):
    from mlx_lm import load
    from mlx_lm.convert import convert as mlx_convert
    from mlx_lm.utils import compute_bits_per_weight

    convert(checkpoints("llama"), tmp_path / "fp")
    mlx_convert(
        str(tmp_path / "fp"), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=64
    )
    data = info(tmp_path / "q4")
    q = data["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 64, "affine")
    assert data["parameters"] == info(tmp_path / "fp")["parameters"]
    model, _ = load(str(tmp_path / "q4"))
    assert q["bits_per_weight"] == pytest.approx(compute_bits_per_weight(model), abs=0.01)


def test_info_of_bin_checkpoint_and_sentencepiece(checkpoints, tmp_path):
    import shutil

    import sentencepiece as spm

    from mlxlocal.tiny import CORPUS

    src = checkpoints("llama", safe=False)
    data = info(src)
    assert data["format"] == "hf (bin)" and data["parameters"] == _hf_param_count(src)
    d = tmp_path / "sp"
    shutil.copytree(src, d)
    (d / "tokenizer.json").unlink()
    (tmp_path / "corpus.txt").write_text(CORPUS * 5)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(d / "tokenizer"),
        vocab_size=120,
        minloglevel=2,
    )
    assert info(d)["tokenizer"] == "SentencePiece (tokenizer.model)"


def test_info_cli_table_and_json(checkpoints):
    runner = CliRunner()
    table = runner.invoke(cli, ["info", str(checkpoints("qwen2"))])
    assert table.exit_code == 0, table.output
    for label in (
        "architecture",
        "parameters",
        "quantization",
        "size on disk",
        "tokenizer",
        "chat template",
        "context length",
    ):
        assert label in table.output
    raw = runner.invoke(cli, ["info", "--json", str(checkpoints("qwen2"))])
    assert json.loads(raw.output)["model_type"] == "qwen2"
