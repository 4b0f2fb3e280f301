"""The training engine: learning, what it may change, accumulation, QLoRA/DoRA/full, the run dir."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import SCHEDULED_RUN, read_metrics, write_recipe
from mlx.utils import tree_flatten

from mlxlocal import MlxLocalError
from mlxlocal.adapters.layers import adapter_keys, add_adapters
from mlxlocal.data import Example, collate
from mlxlocal.models import load
from mlxlocal.recipe import load_recipe
from mlxlocal.train.optim import build_schedule
from mlxlocal.train.run import load_base, run_recipe
from mlxlocal.train.trainer import gradient_checkpointing, make_step


def rows(seed: int = 0, count: int = 8) -> list[list[Example]]:
    """Packed rows of 2 random examples each, with an untrained prompt part."""
    rng = np.random.default_rng(seed)

    def example():
        n = int(rng.integers(5, 15))
        return Example(rng.integers(3, 500, n).tolist(), [0] * 2 + [1] * (n - 2))

    return [[example(), example()] for _ in range(count)]


def lora_model(path, dropout: float = 0.0):
    model, _ = load(path)
    mx.random.seed(0)
    keys = adapter_keys(list(model.layers), ["q_proj", "v_proj"])
    add_adapters(model, "lora", 4, 2.0, dropout, keys, list(range(len(model.layers))))
    return model


def params(model, trainable: bool) -> dict[str, np.ndarray]:
    tree = model.trainable_parameters() if trainable else model.parameters()
    return {k: np.array(v) for k, v in tree_flatten(tree)}


@pytest.mark.parametrize("clip", [None, 0.05])
def test_accumulated_batches_give_the_update_of_one_larger_batch(mlx_checkpoints, clip):
    path = mlx_checkpoints("llama")
    data = rows()
    updated = []
    for micro in ([collate(data, 64)], [collate(data[i : i + 2], 64) for i in range(0, 8, 2)]):
        model = lora_model(path)
        b = [(k, v + 0.05) for k, v in tree_flatten(model.trainable_parameters()) if "lora_b" in k]
        model.load_weights(b, strict=False)  # B ≠ 0: every adapter gets gradients
        step = make_step(model, optim.SGD(learning_rate=1.0), grad_clip=clip, packed=True)
        loss, n, *_ = step(micro)
        mx.eval(model.parameters(), loss, n)
        updated.append((loss.item() / n.item(), params(model, trainable=True)))
    (loss_big, big), (loss_acc, acc) = updated
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    for name in big:
        np.testing.assert_allclose(acc[name], big[name], atol=1e-5)


def test_lora_changes_only_adapters_and_learns(mlx_checkpoints):
    model = lora_model(mlx_checkpoints("llama"), dropout=0.1)
    before = params(model, trainable=False)
    step = make_step(model, optim.AdamW(learning_rate=1e-2), packed=True)
    batch = collate(rows(1, 4), 64)
    losses = []
    for _ in range(8):
        loss, n, *_ = step([batch])
        mx.eval(model.parameters(), loss, n)
        losses.append(loss.item() / n.item())
    after = params(model, trainable=False)
    adapters = set(params(model, trainable=True))
    assert adapters and all(k.rsplit(".", 1)[1] in ("lora_a", "lora_b") for k in adapters)
    for name, value in before.items():
        if name in adapters:
            continue
        assert np.array_equal(after[name], value), f"{name} changed"  # bit-identical
    assert any(not np.array_equal(after[k], before[k]) for k in adapters)
    assert losses[-1] < losses[0] - 0.5


def test_gradient_checkpointing_gives_the_same_step(mlx_checkpoints):
    path = mlx_checkpoints("llama")
    batch = collate(rows(2, 4), 64)
    results = []
    for checkpointing in (False, True):
        model = lora_model(path)
        step = make_step(model, optim.SGD(learning_rate=1.0), packed=True)
        with gradient_checkpointing(model) if checkpointing else _nothing():
            loss, n, *_ = step([batch])
            mx.eval(model.parameters(), loss, n)
        results.append((loss.item(), params(model, trainable=True)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, value in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], value, atol=1e-6)
    assert type(model.layers[0]).__call__.__name__ == "__call__"  # restored afterwards


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def test_compiled_step_equals_the_plain_one(mlx_checkpoints, compiled):
    """The plain step is the compiled one's reference; the recipe runs below compile, as users'."""
    path = mlx_checkpoints("llama")
    data = rows(3, 4)
    micro = [collate(data[:2], 64), collate(data[2:], 64)]  # accumulation inside the graph
    results = []
    for compile in (False, True):
        model = lora_model(path, dropout=0.1)
        mx.random.seed(5)
        step = make_step(
            model, optim.AdamW(learning_rate=1e-2), grad_clip=1.0, packed=True, compile=compile
        )
        for _ in range(2):
            loss, n, *_ = step(micro)
            mx.eval(model.parameters(), loss, n)
        results.append((loss.item(), params(model, trainable=True)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, value in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], value, atol=1e-5)


def test_schedules_warm_up_then_decay():
    lr = lambda s, step: s(mx.array(step)).item()  # noqa: E731
    cosine = build_schedule(1.0, "cosine", 10, warmup_steps=4, min_learning_rate=0.1)
    assert [lr(cosine, i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr(cosine, 4) == pytest.approx(1.0) and lr(cosine, 10) == pytest.approx(0.1)
    linear = build_schedule(1.0, "linear", 10, min_learning_rate=0.0)
    assert [lr(linear, i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr(build_schedule(0.3, "constant", 10), 7) == pytest.approx(0.3)


def test_a_recipe_run_learns_and_leaves_a_complete_run_directory(
    mlx_checkpoints, tmp_path, compiled
):
    path = mlx_checkpoints("llama")
    recipe = write_recipe(
        tmp_path,
        path,
        data__valid_fraction=0.1,
        training__steps=12,
        training__learning_rate=1e-2,
        eval__every=6,
        checkpoint__every=4,
        **SCHEDULED_RUN,
    )
    summary = run_recipe(load_recipe(recipe))
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "learning_rate", "tokens_per_s", "trained_tokens", "peak_memory_gb"} <= set(
        metrics[0]
    )
    assert [m["step"] for m in metrics if "val_loss" in m] == [6, 12]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0  # a tiny learnable task
    assert summary.training.loss == pytest.approx(metrics[-1]["loss"])
    assert sorted(p.name for p in run.glob("step-*")) == ["step-12", "step-8"]
    assert (run / "latest").read_text() == "step-12"
    assert (run / "summary.json").exists() and (run / "recipe.yaml").exists()
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 2.0
    # The base model on disk is untouched; the adapters change its logits.
    ids = mx.array([[5, 6, 7, 8]])
    base, _ = load(path)
    tuned, _ = load(path, run / "adapters")
    assert np.abs(np.array(tuned(ids)) - np.array(base(ids))).max() > 1e-3
    with pytest.raises(MlxLocalError, match="finished run"):
        run_recipe(load_recipe(recipe))


def test_adapters_from_a_run_work_in_mlx_lm_generate(mlx_checkpoints, tmp_path, compiled):
    from mlx_lm import generate

    path = mlx_checkpoints("llama")
    run_recipe(load_recipe(write_recipe(tmp_path, path, training__steps=4)))
    adapters = tmp_path / "run" / "adapters"
    model, tokenizer = load(path, adapters)
    ours = generate(model, tokenizer, "The quick", max_tokens=8)
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(path)]
        + ["--adapter-path", str(adapters), "--prompt", "The quick", "--max-tokens", "8"]
        + ["--ignore-chat-template"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ours.strip() and ours.strip() in out.stdout


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_qlora_trains_adapters_over_a_quantized_base(mlx_checkpoints, tmp_path, compiled, bits):
    recipe = write_recipe(
        tmp_path,
        mlx_checkpoints("llama"),
        model__quantize={"bits": bits, "group_size": 32},
        training__steps=5,
        training__learning_rate=5e-3,
    )
    summary = run_recipe(load_recipe(recipe))
    metrics = read_metrics(tmp_path / "run")
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert summary.trainable_parameters < summary.parameters / 10
    config = json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())
    assert config["mlxlocal"]["quantize"] == {"bits": bits, "group_size": 32}


def test_qlora_quantizes_the_blocks_and_keeps_the_family_high_precision_layers(
    mlx_checkpoints, tmp_path
):
    quantize = {"bits": 3, "group_size": 32}
    recipe = write_recipe(tmp_path, mlx_checkpoints("llama"), model__quantize=quantize)
    model, _, _ = load_base(load_recipe(recipe), tmp_path, lambda _: None)
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (3, 32)
    assert type(model.lm_head) is nn.Linear  # convert/llama.yaml: keep_high_precision
    assert type(model.model.embed_tokens) is nn.Embedding


def test_dora_and_full_fine_tuning_learn(mlx_checkpoints, tmp_path, compiled):
    path = mlx_checkpoints("llama")
    for method in ("dora", "full"):
        folder = tmp_path / method
        folder.mkdir()
        method_section = {"type": method} if method == "full" else {"type": method, "rank": 4}
        extra = {"training__learning_rate": 1e-3} if method == "full" else {}
        summary = run_recipe(
            load_recipe(write_recipe(folder, path, method=method_section, **extra))
        )
        metrics = read_metrics(folder / "run")
        assert metrics[-1]["loss"] < metrics[0]["loss"]
        if method == "full":
            assert summary.trainable_parameters == summary.parameters
            saved = mx.load(str(folder / "run" / "adapters" / "adapters.safetensors"))
            assert "lm_head.weight" in saved


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    mlx_checkpoints, tmp_path, compiled
):
    recipe = write_recipe(
        tmp_path,
        mlx_checkpoints("llama"),
        method={"type": "full"},
        training__optimizer="sgd",
        training__learning_rate=1e30,
        checkpoint__every=1,
    )
    with pytest.raises(MlxLocalError, match=r"loss became (nan|inf) at step \d.*step-\d"):
        run_recipe(load_recipe(recipe))
    run = tmp_path / "run"
    assert not (run / "adapters").exists() and not (run / "summary.json").exists()
    latest = (run / "latest").read_text()
    last = (run / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["loss"] is None and "NaN" not in last  # null: JSON has no NaN
    assert all(
        np.isfinite(np.array(v)).all()
        for v in mx.load(str(run / latest / "adapters.safetensors")).values()
    )


def test_epochs_become_steps_and_grad_accumulation_counts_micro_batches(
    mlx_checkpoints, tmp_path, compiled
):
    recipe = write_recipe(
        tmp_path,
        mlx_checkpoints("llama"),
        data__packing=False,
        training__steps=None,
        training__epochs=2,
        training__batch_size=8,
        training__grad_accumulation=2,
    )
    summary = run_recipe(load_recipe(recipe))
    assert summary.total_steps == 2 * 9 // 2  # 72 examples → 9 batches of 8 per epoch
    assert read_metrics(tmp_path / "run")[-1]["epoch"] == 1


def test_full_fine_tuning_refuses_a_quantized_model(mlx_checkpoints, tmp_path):
    from mlx_lm import convert as mlx_convert

    quantized = tmp_path / "q"
    mlx_convert(str(mlx_checkpoints("llama")), str(quantized), quantize=True, q_group_size=32)
    recipe = write_recipe(tmp_path, quantized, method={"type": "full"})
    with pytest.raises(MlxLocalError, match="quantized"):
        run_recipe(load_recipe(recipe))
