"""`fuse`: the fused model computes what base + adapters compute, float or re-quantized."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import mlx_logits, probe_ids
from mlx_lm import load as mlx_load

from mlxlocal.adapters.files import adapter_config
from mlxlocal.adapters.layers import LoRALinear, adapter_keys, add_adapters, save_adapters
from mlxlocal.cli import cli
from mlxlocal.models import load
from mlxlocal.train.fuse import fuse

IDS = probe_ids(48)


def trained_looking_adapters(model_path, out, kind: str):
    """Adapters with B and m moved off their start, saved to `out`; returns the adapted model."""
    model, _ = load(model_path)
    mx.random.seed(0)
    keys = adapter_keys(list(model.layers), ["q_proj", "v_proj", "down_proj"])
    add_adapters(model, kind, 4, 2.0, 0.0, keys, [0, 1])
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.2
            if kind == "dora":
                m.m = m.m * 1.1
    out.mkdir()
    save_adapters(model, out, adapter_config(kind, [0, 1], 2, rank=4, scale=2.0, keys=keys))
    return model


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_float_model_equals_base_plus_adapters(mlx_checkpoints, tmp_path, kind):
    path = mlx_checkpoints("llama")
    adapted = trained_looking_adapters(path, tmp_path / "adapters", kind)
    result = fuse(path, tmp_path / "adapters", tmp_path / "fused")
    assert result.fused_layers == 6 and not result.quantized
    fused, _ = mlx_load(str(tmp_path / "fused"))  # a plain checkpoint: no adapter needed
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    np.testing.assert_allclose(mlx_logits(fused, IDS), mlx_logits(adapted, IDS), atol=1e-4)
    assert np.abs(mlx_logits(fused, IDS) - mlx_logits(load(path)[0], IDS)).max() > 1e-2


@pytest.mark.parametrize("bits", [3, 4])
def test_fusing_into_a_quantized_base_requantizes_or_dequantizes(mlx_checkpoints, tmp_path, bits):
    from mlx_lm import convert as mlx_convert

    quantized = tmp_path / "q"
    mlx_convert(str(mlx_checkpoints("llama")), str(quantized), quantize=True, q_bits=bits,
                q_group_size=32)  # fmt: skip
    adapted = trained_looking_adapters(quantized, tmp_path / "adapters", "dora")
    expected = mlx_logits(adapted, IDS)

    fuse(quantized, tmp_path / "adapters", tmp_path / "dense", dequantize=True)
    dense, _ = mlx_load(str(tmp_path / "dense"))
    assert "quantization" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dense.named_modules())
    np.testing.assert_allclose(mlx_logits(dense, IDS), expected, atol=1e-4)

    result = fuse(quantized, tmp_path / "adapters", tmp_path / "requantized")
    assert result.quantized
    requantized, _ = mlx_load(str(tmp_path / "requantized"))
    q_proj = requantized.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == bits
    # Quantizing W + ΔW again costs no more than quantizing W did in the first place.
    requantizing = np.abs(mlx_logits(requantized, IDS) - mlx_logits(dense, IDS)).mean()
    quantizing = np.abs(
        mlx_logits(load(quantized)[0], IDS) - mlx_logits(load(mlx_checkpoints("llama"))[0], IDS)
    )
    assert requantizing < quantizing.mean()


def test_fuse_cli_is_atomic_and_explains_mistakes(mlx_checkpoints, tmp_path):
    path = mlx_checkpoints("llama")
    trained_looking_adapters(path, tmp_path / "adapters", "lora")
    out = tmp_path / "fused"
    runner = CliRunner()
    done = runner.invoke(cli, ["fuse", str(path), str(tmp_path / "adapters"), str(out)])
    assert done.exit_code == 0, done.output
    assert "fused 6 adapted layers" in done.output
    again = runner.invoke(cli, ["fuse", str(path), str(tmp_path / "adapters"), str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    missing = runner.invoke(cli, ["fuse", str(path), str(tmp_path), str(tmp_path / "x")])
    assert missing.exit_code == 1 and "not an adapter folder" in missing.output
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))
    # A config whose rank is not the tensors' (mlx-lm builds layers from it, then fails): refused
    # in one line by every verb that reads the adapter (found by the hostile corpus: it fused).
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 10**9
    (tmp_path / "adapters" / "adapter_config.json").write_text(json.dumps(config))
    for args in (["fuse", str(path)], ["export", "peft"]):
        wrong = runner.invoke(cli, [*args, str(tmp_path / "adapters"), str(tmp_path / "y")])
        assert wrong.exit_code == 1, wrong.output
        assert "lora_parameters.rank is 1000000000 but the weights have rank" in wrong.output
        assert not (tmp_path / "y").exists()
