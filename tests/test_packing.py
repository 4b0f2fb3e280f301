"""Packed rows train each example as if alone; the chunked loss equals the full one."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlxlocal import MlxLocalError
from mlxlocal.adapters.layers import adapter_keys, add_adapters, default_modules
from mlxlocal.data import Example, collate
from mlxlocal.models import load
from mlxlocal.train.loss import check_output_head, loss_sums

ARCHS = ["llama", "mistral", "qwen2", "gemma2", "phi3"]


def examples(seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (9, 14, 5, 11, 7):
        tokens = rng.integers(3, 500, n).tolist()
        weights = [0] * (n // 3) + [1] * (n - n // 3)  # a "prompt" that is not trained on
        out.append(Example(tokens, weights))
    return out


def mean_loss(model, batch, packed, chunk=None) -> float:
    total, n = loss_sums(model, batch.tokens, batch.weights, batch.segments, packed, chunk)
    return total.item() / n.item()


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_examples_do_not_see_each_other(mlx_checkpoints, arch):
    model, _ = load(mlx_checkpoints(arch))
    exs = examples()
    alone = [mean_loss(model, collate([[e]], 64), packed=False) for e in exs]
    packed = collate([exs[:3], exs[3:]], 64)  # two rows holding 3 and 2 examples
    seg, w = np.array(packed.segments), np.array(packed.weights)
    got = []
    for row, count in ((0, 3), (1, 2)):
        for k in range(1, count + 1):
            only = np.zeros_like(w)
            only[row] = w[row] * (seg[row] == k)
            one = type(packed)(packed.tokens, mx.array(only), packed.segments)
            got.append(mean_loss(model, one, packed=True))
    np.testing.assert_allclose(got, alone, atol=1e-5)
    # Without the mask the packed examples do leak into each other.
    leaky = mean_loss(model, type(packed)(packed.tokens, packed.weights, packed.segments), False)
    assert abs(leaky - mean_loss(model, packed, True)) > 1e-3


@pytest.mark.parametrize("arch, bits", [(a, None) for a in ARCHS] + [("llama", 4), ("gemma2", 8)])
def test_chunked_loss_and_gradients_equal_the_full_loss(mlx_checkpoints, arch, bits):
    model, _ = load(mlx_checkpoints(arch))
    if bits:  # QLoRA: the head's gradient for the hidden states goes through quantized_matmul
        nn.quantize(model, group_size=32, bits=bits)
    check_output_head(model)
    mx.random.seed(0)
    keys = adapter_keys(list(model.layers), default_modules(model.model_type))
    add_adapters(model, "lora", 4, 2.0, 0.0, keys, list(range(len(model.layers))))
    b = [(k, v + 0.1) for k, v in tree_flatten(model.trainable_parameters()) if "lora_b" in k]
    model.update(tree_unflatten(b))  # B ≠ 0, so every adapter gets gradients
    batch = collate([examples()[:3], examples()[3:]], 64)

    def value_and_grads(chunk):
        fn = nn.value_and_grad(
            model, lambda t, w, s: loss_sums(model, t, w, s, packed=True, chunk_size=chunk)
        )
        (loss, _), grads = fn(batch.tokens, batch.weights, batch.segments)
        return loss.item(), dict(tree_flatten(grads))

    full_loss, full_grads = value_and_grads(None)
    for chunk in (5, 16):
        loss, grads = value_and_grads(chunk)
        assert loss == pytest.approx(full_loss, rel=1e-6)
        for name, g in full_grads.items():
            np.testing.assert_allclose(np.array(grads[name]), np.array(g), atol=1e-5)


def test_full_fine_tuning_gradients_reach_the_chunked_head(mlx_checkpoints):
    model, _ = load(mlx_checkpoints("llama"))
    batch = collate([examples()[:3]], 64)
    fn = nn.value_and_grad(model, lambda t, w, s: loss_sums(model, t, w, s, True, 4))
    _, grads = fn(batch.tokens, batch.weights, batch.segments)
    _, full = nn.value_and_grad(model, lambda t, w, s: loss_sums(model, t, w, s, True))(
        batch.tokens, batch.weights, batch.segments
    )
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        got, want = dict(tree_flatten(grads))[name], dict(tree_flatten(full))[name]
        assert mx.abs(want).sum().item() > 0
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_chunking_refuses_a_model_whose_head_it_does_not_know(mlx_checkpoints):
    model, _ = load(mlx_checkpoints("llama"))
    model.final_logit_softcapping = 5.0  # a head unlike the model's own __call__
    with pytest.raises(MlxLocalError, match="loss_chunk_size"):
        check_output_head(model)
