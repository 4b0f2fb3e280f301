"""LoRA/DoRA layers against the formulas (numpy), over float and 2–8-bit bases; adapter files."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import probe_ids
from mlx.utils import tree_flatten

from mlxlocal import MlxLocalError
from mlxlocal.adapters.files import adapter_config
from mlxlocal.adapters.formula import lora_scale
from mlxlocal.adapters.layers import (
    DoRALinear,
    LoRALinear,
    adapter_keys,
    add_adapters,
    dense_weight,
    load_adapters,
    resolve_layers,
    save_adapters,
)
from mlxlocal.models import load

BITS = [2, 3, 4, 5, 6, 8]


def base_layer(bits: int | None, bias: bool = True) -> nn.Module:
    mx.random.seed(0)
    layer = nn.Linear(128, 64, bias=bias)
    if bias:
        layer.bias = mx.random.normal((64,))
    return layer if bits is None else nn.QuantizedLinear.from_linear(layer, 32, bits)


def perturb(layer: LoRALinear) -> None:
    """A trained-looking adapter: B and m away from their starting values."""
    mx.random.seed(1)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    if isinstance(layer, DoRALinear):
        layer.m = layer.m * (1 + 0.2 * mx.random.uniform(shape=layer.m.shape))


def reference(layer: LoRALinear, x: np.ndarray) -> np.ndarray:
    """The formula in float64: W' = W + s·BᵀAᵀ; DoRA rescales its rows to m."""
    w = np.array(dense_weight(layer.linear), np.float64)
    a, b = np.array(layer.lora_a, np.float64), np.array(layer.lora_b, np.float64)
    adapted = w + layer.scale * (a @ b).T
    if isinstance(layer, DoRALinear):
        m = np.array(layer.m, np.float64)
        adapted = adapted * (m / np.linalg.norm(adapted, axis=1))[:, None]
    y = x @ adapted.T
    return y + np.array(layer.linear.bias) if "bias" in layer.linear else y


@pytest.mark.parametrize("bits", [None, *BITS])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_layer_matches_formula(cls, bits):
    layer = cls(base_layer(bits), rank=4, scale=2.0)
    x = np.random.default_rng(0).standard_normal((3, 5, 128)).astype(np.float32)
    start = np.array(layer(mx.array(x)))
    # Untrained (B = 0, m = ‖W‖) the adapter leaves the base layer's output unchanged.
    np.testing.assert_allclose(start, np.array(layer.linear(mx.array(x))), atol=1e-4)
    perturb(layer)
    got = np.array(layer(mx.array(x)))
    np.testing.assert_allclose(got, reference(layer, x), rtol=1e-4, atol=1e-4)
    # The fused weight is the same function.
    fused = x @ np.array(layer.fused_weight()).T
    fused = fused + np.array(layer.linear.bias) if "bias" in layer.linear else fused
    np.testing.assert_allclose(fused, got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [None, 3, 6])
def test_dora_gradients_reach_magnitude_and_low_rank(bits):
    layer = DoRALinear(base_layer(bits), rank=4, scale=2.0)
    perturb(layer)
    x = mx.random.normal((2, 7, 128))

    def loss(params):
        layer.update(params)
        return (layer(x) ** 2).sum()

    grads = mx.grad(loss)(layer.trainable_parameters())
    assert sorted(k for k, _ in tree_flatten(grads)) == ["lora_a", "lora_b", "m"]
    assert all(mx.abs(g).sum().item() > 0 for _, g in tree_flatten(grads))


def test_rslora_scale():
    assert lora_scale(16, 4, rslora=False) == 4.0
    assert lora_scale(16, 4, rslora=True) == 8.0


def test_layers_and_modules_are_resolved_with_clear_errors():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers(2, 4) == [2, 3]
    assert resolve_layers([3, 0], 4) == [0, 3]
    with pytest.raises(MlxLocalError, match="method.layers"):
        resolve_layers(5, 4)
    with pytest.raises(MlxLocalError, match="method.layers"):
        resolve_layers([4], 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = {"q_proj": nn.Linear(8, 8), "o_proj": nn.Linear(8, 8)}
            self.mlp = {"up_proj": nn.Linear(8, 8)}

    blocks = [Block()]
    assert adapter_keys(blocks, ["q_proj", "mlp.up_proj"]) == ["mlp.up_proj", "self_attn.q_proj"]
    assert len(adapter_keys(blocks, None)) == 3
    with pytest.raises(MlxLocalError, match="'q_prj'.*self_attn.q_proj"):
        adapter_keys(blocks, ["q_prj"])


def quantize_blocks(model, bits: int) -> None:
    nn.quantize(
        model, 32, bits, class_predicate=lambda p, m: isinstance(m, nn.Linear) and "layers" in p
    )


def adapted_model(path, kind: str, layers: list[int], bits: int | None = None):
    """The model at `path`, optionally quantized, with trained-looking adapters on `layers`."""
    model, _ = load(path)
    if bits is not None:
        quantize_blocks(model, bits)
    mx.random.seed(0)
    keys = adapter_keys([model.layers[i] for i in layers], ["q_proj", "v_proj", "down_proj"])
    add_adapters(model, kind, rank=4, scale=2.0, dropout=0.0, keys=keys, layers=layers)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            perturb(m)
    return model, keys


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_only_adapters_are_trainable(mlx_checkpoints, kind):
    model, _ = adapted_model(mlx_checkpoints("llama"), kind, [1])
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    leaves = {"lora_a", "lora_b"} | ({"m"} if kind == "dora" else set())
    assert names and {n.rsplit(".", 1)[1] for n in names} == leaves
    assert all(n.startswith("model.layers.1.") for n in names)


@pytest.mark.parametrize(("kind", "bits"), [("lora", None), ("dora", None), ("dora", 4)])
def test_saved_adapters_load_in_mlx_lm_and_ours(mlx_checkpoints, tmp_path, kind, bits):
    from mlx_lm import convert as mlx_convert
    from mlx_lm import load as mlx_load

    path = mlx_checkpoints("llama", num_hidden_layers=4)
    if bits is not None:  # a quantized checkpoint as mlx-lm writes them
        mlx_convert(str(path), str(tmp_path / "q"), quantize=True, q_group_size=32, q_bits=bits)
        path = tmp_path / "q"
    layers = [1, 3]  # mlx-lm knows only "the last N": layer 2 gets a no-op adapter there
    model, keys = adapted_model(path, kind, layers)
    out = tmp_path / "adapters"
    out.mkdir()
    save_adapters(model, out, adapter_config(kind, layers, 4, rank=4, scale=2.0, keys=keys))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == kind and config["num_layers"] == 3
    assert config["lora_parameters"]["keys"] == keys
    saved = mx.load(str(out / "adapters.safetensors"))
    assert saved["model.layers.1.self_attn.q_proj.lora_a"].shape == (64, 4)  # (in, r)
    assert saved["model.layers.1.self_attn.q_proj.lora_b"].shape == (4, 64)  # (r, out)

    ids = mx.array([probe_ids()])
    expected = np.array(model(ids))
    assert np.abs(expected - np.array(load(path)[0](ids))).max() > 1e-3  # adapters matter
    theirs, _ = mlx_load(str(path), adapter_path=str(out))
    np.testing.assert_allclose(np.array(theirs(ids)), expected, atol=1e-5)
    ours, _ = load(path, out)
    np.testing.assert_allclose(np.array(ours(ids)), expected, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_dora_over_odd_bit_bases_round_trips(mlx_checkpoints, tmp_path, bits):
    """mlx-lm's DoRA computes a 3/5/6-bit layer's input width as in·(32 // bits): ours does not."""
    path = mlx_checkpoints("llama")
    model, keys = adapted_model(path, "dora", [0, 1], bits)
    save_adapters(model, tmp_path, adapter_config("dora", [0, 1], 2, rank=4, scale=2.0, keys=keys))
    fresh, _ = load(path)
    quantize_blocks(fresh, bits)
    load_adapters(fresh, tmp_path)
    ids = mx.array([probe_ids()])
    np.testing.assert_allclose(np.array(fresh(ids)), np.array(model(ids)), atol=1e-5)


def test_adapters_for_another_model_are_refused(mlx_checkpoints, tmp_path):
    model, keys = adapted_model(mlx_checkpoints("llama"), "lora", [0])
    save_adapters(model, tmp_path, adapter_config("lora", [0], 2, rank=4, scale=2.0, keys=keys))
    other, _ = load(mlx_checkpoints("llama", hidden_size=128, intermediate_size=256))
    with pytest.raises(MlxLocalError, match="shape"):
        load_adapters(other, tmp_path)
