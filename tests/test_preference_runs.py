"""Preference tuning end to end: the data format, recipe errors, the cached DPO reference, every
method, exact resume after SIGKILL, and the `preference` evaluation task."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from helpers import (
    SCHEDULED_RUN,
    assert_same_run,
    finished_run,
    killed_run,
    make_adapter,
    read_metrics,
    uninterrupted_run,
    write_recipe,
)
from helpers import run_cli as mlxlocal

from mlxlocal.data import DataSection, Pair, builtin_dataset, load_examples
from mlxlocal.errors import MlxLocalError
from mlxlocal.models import load, load_tokenizer
from mlxlocal.recipe import load_recipe

ROWS = [json.loads(line) for line in builtin_dataset("polite-train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:24]))
    return path


@pytest.fixture(scope="module")
def tokenizer(mlx_checkpoints):
    return load_tokenizer(mlx_checkpoints("llama"))


def _load(tokenizer, path, **settings):
    return load_examples(DataSection(train=str(path), **settings), tokenizer)


def test_rows_become_pairs_with_the_loss_on_the_answers_only(tokenizer, tmp_path):
    rows = [
        {"prompt": "Say hi.", "chosen": "Hello, how can I help?", "rejected": "What."},
        {  # chat messages on both sides, as TRL's conversational format
            "prompt": [{"role": "user", "content": "Say hi."}],
            "chosen": [{"role": "assistant", "content": "Hello, how can I help?"}],
            "rejected": [{"role": "assistant", "content": "What."}],
        },
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "p.csv"  # other column names, mapped by data.fields
    csv.write_text('question,good,bad\nSay hi.,"Hello, how can I help?",What.\n')
    (a, b), report = _load(tokenizer, jsonl)
    assert report.format == "preference" and report.examples == 2
    (c,), _ = _load(
        tokenizer, csv, fields={"prompt": "question", "chosen": "good", "rejected": "bad"}
    )
    assert a == b == c  # text and messages render alike, with the chat template
    assert isinstance(a, Pair)
    chosen, rejected = a.chosen, a.rejected
    start = chosen.weights.index(1)
    assert start == rejected.weights.index(1)  # the prompt ends where both answers start
    assert chosen.tokens[:start] == rejected.tokens[:start]
    assert chosen.tokens[start:] != rejected.tokens[start:]
    answer = tokenizer.encode("Hello, how can I help?", add_special_tokens=False)
    assert chosen.tokens[start : start + len(answer)] == answer
    assert not any(chosen.weights[:start]) and all(chosen.weights[start : start + len(answer)])


def test_bad_pairs_are_named_or_counted(tokenizer, tmp_path):
    good = {"prompt": "Say hi.", "chosen": "Hello there.", "rejected": "No."}
    rows = [
        good,
        {"prompt": "Say hi.", "chosen": "Hello there."},  # line 2: no rejected
        {**good, "rejected": "Hello there."},  # line 3: the same answer twice
        {**good, "prompt": "word " * 200},  # line 4: a prompt past max_length
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MlxLocalError, match=r"bad.jsonl:2: no 'rejected' field"):
        _load(tokenizer, path, max_length=64)
    pairs, report = _load(tokenizer, path, max_length=64, bad_lines="skip")
    assert len(pairs) == 1
    assert (report.bad_lines, report.identical, report.dropped) == (1, 1, 1)
    assert any(n.startswith("bad.jsonl:3: dropped: chosen and rejected") for n in report.notes)
    assert any(n.startswith("bad.jsonl:4: dropped: nothing to learn") for n in report.notes)
    assert "1 identical" in report.summary()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.objective=dop", "'dop' is not allowed; did you mean dpo?"),
        ("method.beta=0.2", "method.beta: applies to preference objectives"),
        ("method.betta=0.2", "method.betta: unknown key; did you mean beta?"),
        ("method.label_smoothing=0.7", "method.label_smoothing: input should be less than 0.5"),
    ],
)
def test_recipe_mistakes_are_one_line(mlx_checkpoints, tmp_path, override, message):
    recipe = write_recipe(tmp_path, mlx_checkpoints("llama"))
    with pytest.raises(MlxLocalError, match=message.replace("?", r"\?")):
        load_recipe(recipe, [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.objective=orpo", "method.simpo_gamma=1"], "applies to objective simpo only"),
        (["method.objective=dpo", "eval.task=classify", "eval.data=x.jsonl"], "task preference"),
        (["method.objective=dpo", "data.packing=true"], "pairs are not packed"),
        (["method.objective=orpo", "method.reference=sft"], "applies to objective dpo only"),
    ],
)
def test_preference_settings_that_contradict_are_refused(
    mlx_checkpoints, tmp_path, overrides, message
):
    recipe = write_recipe(tmp_path, mlx_checkpoints("llama"))
    with pytest.raises(MlxLocalError, match=message):
        load_recipe(recipe, overrides)


def test_objective_and_data_must_agree(mlx_checkpoints, pairs_file, tmp_path):
    model = mlx_checkpoints("llama")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    sft_on_pairs = write_recipe(tmp_path / "a", model, data__train=str(pairs_file))
    done = mlxlocal("run", str(sft_on_pairs))
    assert done.returncode == 1 and "set method.objective: dpo, orpo or simpo" in done.stderr
    dpo_on_chat = write_recipe(tmp_path / "b", model, method__objective="dpo")
    done = mlxlocal("run", str(dpo_on_chat))
    assert done.returncode == 1 and "cannot train on chat data" in done.stderr


def _recipe(folder, model, pairs_file, **overrides):
    return write_recipe(
        folder,
        model,
        data={"train": str(pairs_file), "valid": str(pairs_file), "max_length": 96},
        **{"training__steps": 6, "training__batch_size": 4, **overrides},
    )


@pytest.mark.parametrize(
    ("objective", "method", "quantize", "chunk"),
    [
        ("dpo", {"type": "dora", "rank": 4}, None, None),
        ("orpo", {"type": "full"}, None, 16),  # the chunked loss, the head trained
        ("simpo", {"type": "lora", "rank": 4}, {"bits": 4, "group_size": 32}, None),  # QLoRA
    ],
)
def test_every_objective_trains_every_method(
    mlx_checkpoints, pairs_file, tmp_path, objective, method, quantize, chunk
):
    model = mlx_checkpoints("llama")
    recipe = _recipe(
        tmp_path,
        model,
        pairs_file,
        method={**method, "objective": objective},
        model__quantize=quantize,
        eval={"task": "preference", "every": 3},
        training__learning_rate=1e-3,
        training__loss_chunk_size=chunk,
    )
    finished_run(recipe)
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    for name in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
        assert all(np.isfinite(m[name]) for m in metrics)
        assert "val_" + name in metrics[2] and "val_" + name in metrics[5]
    assert (run / "reference-train.npz").exists() == (objective == "dpo")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"].endswith(objective)
    scores = summary["evaluation"]
    assert scores["task"] == "preference"
    assert 0 <= scores["before"]["accuracy"] <= 1 and scores["after"]["examples"] == 24


@pytest.fixture(scope="module")
def dpo_recipe(mlx_checkpoints, pairs_file, tmp_path_factory):
    """DPO with dropout (RNG), accumulation, warmup + cosine: all must resume exactly."""
    return _recipe(
        tmp_path_factory.mktemp("dpo"),
        mlx_checkpoints("llama"),
        pairs_file,
        method={"type": "lora", "rank": 4, "dropout": 0.1, "objective": "dpo", "beta": 0.2},
        training__grad_accumulation=2,
        checkpoint__every=2,
        **SCHEDULED_RUN,
    )


def test_the_reference_is_the_base_scored_once_and_cached(dpo_recipe, mlx_checkpoints, tokenizer):
    from mlxlocal.train.preference import ReferenceCache, reference_logps

    run = uninterrupted_run(dpo_recipe)
    recipe = load_recipe(dpo_recipe)
    pairs, _ = load_examples(recipe.data, tokenizer)
    base, _ = load(mlx_checkpoints("llama"))  # no adapters: the reference
    fresh = reference_logps(base, pairs, 3, 96)  # other batches, same scores
    saved = np.load(run / "reference-train.npz")["logps"]
    np.testing.assert_allclose(saved, fresh, atol=1e-4)
    assert (saved[:, 0] != saved[:, 1]).all()
    # A cache is used only for the pairs and the reference it was made for.
    source = mlx_checkpoints("llama")
    cache = ReferenceCache.open(run, "base", source, {"train": pairs}, resuming=True)
    assert not cache.missing  # no model needed
    cache = ReferenceCache.open(run, "base", source, {"train": pairs[:5]}, resuming=True)
    assert cache.missing == ["train"]


def test_a_killed_dpo_run_resumes_exactly_with_its_cached_reference(dpo_recipe, tmp_path):
    uninterrupted = uninterrupted_run(dpo_recipe)
    run = tmp_path / "run"
    killed_run(dpo_recipe, run, 5)
    cache = run / "reference-train.npz"
    made = cache.stat().st_mtime_ns
    resumed = finished_run(dpo_recipe, run, "--resume")
    assert "resumed at step 4" in resumed.stdout
    assert cache.stat().st_mtime_ns == made  # reused, not recomputed
    assert_same_run(uninterrupted, run, 6)
    for a, b in zip(read_metrics(uninterrupted), read_metrics(run), strict=True):
        assert b["reward_margin"] == pytest.approx(a["reward_margin"], abs=1e-6)


@pytest.fixture(scope="module")
def reference_folders(mlx_checkpoints, tmp_path_factory):
    """References other than the base: adapters over it, and a model of the same vocabulary
    (the tiny Llama with other weights), copied so that a test may touch their files."""
    root = tmp_path_factory.mktemp("references")
    adapter = make_adapter(mlx_checkpoints("llama"), root / "sft-adapter")
    model = shutil.copytree(mlx_checkpoints("llama", seed=1), root / "sft-model")
    return {"adapter": adapter, "model": model}


@pytest.mark.parametrize("kind", ["adapter", "model"])
def test_a_reference_folder_is_scored_into_the_cache_and_tied_to_it(
    reference_folders, mlx_checkpoints, pairs_file, tokenizer, tmp_path, kind
):
    from mlxlocal.train.preference import reference_logps

    base, reference = mlx_checkpoints("llama"), reference_folders[kind]
    method = {"type": "lora", "rank": 4, "objective": "dpo", "reference": str(reference)}
    recipe = _recipe(tmp_path, base, pairs_file, method=method, training__steps=2)
    done = mlxlocal("run", str(recipe))
    assert done.returncode == 0, done.stderr
    assert f"pairs with the reference ({reference})" in done.stdout + done.stderr
    run = tmp_path / "run"
    pairs, _ = load_examples(load_recipe(recipe).data, tokenizer)
    width = min(96, max(len(p.tokens) for p in pairs))  # the run's batches, exactly
    scorer, _ = load(base, adapter=reference) if kind == "adapter" else load(reference)
    direct = reference_logps(scorer, pairs, 4, width)
    with np.load(run / "reference-train.npz") as saved:
        cached = saved["logps"]
        assert str(saved["reference"]) == str(reference)
    np.testing.assert_allclose(cached, direct, rtol=0, atol=1e-5)
    from_base = reference_logps(load(base)[0], pairs, 4, width)
    assert np.abs(cached - from_base).max() > 1e-2  # another reference, another cache
    # Continuing the run reuses the cache; once the reference's files change, it is refused.
    made = (run / "reference-train.npz").stat().st_mtime_ns
    done = mlxlocal("run", str(recipe), "--extend", "1")
    assert done.returncode == 0, done.stderr
    assert (run / "reference-train.npz").stat().st_mtime_ns == made
    weights = next(reference.glob("*.safetensors"))
    os.utime(weights, ns=(made, weights.stat().st_mtime_ns + 10**9))
    done = mlxlocal("run", str(recipe), "--extend", "1")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.strip().endswith(errors[0]), done.stderr
    assert "before its files changed" in errors[0] and "reference-train.npz" in errors[0]


def test_adapters_off_is_the_base(mlx_checkpoints, tokenizer, pairs_file):
    from mlxlocal.adapters.layers import add_adapters
    from mlxlocal.train.preference import adapters_off, reference_logps

    pairs, _ = _load(tokenizer, pairs_file, max_length=96)
    model, _ = load(mlx_checkpoints("llama"))
    base = reference_logps(model, pairs[:6], 3, 96)
    add_adapters(model, "dora", 4, 2.0, 0.0, ["self_attn.q_proj", "mlp.down_proj"], [0, 1])
    q = model.layers[0].self_attn.q_proj
    q.lora_b = q.lora_b + 0.5  # (B starts at zero) the adapters change the model
    adapted = reference_logps(model, pairs[:6], 3, 96)
    with adapters_off(model):
        off = reference_logps(model, pairs[:6], 3, 96)
    assert np.abs(adapted - base).max() > 1e-2
    np.testing.assert_array_equal(off, base)
    np.testing.assert_array_equal(reference_logps(model, pairs[:6], 3, 96), adapted)  # back on


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("name", ["dpo", "orpo", "simpo"])
def test_the_chunked_loss_equals_the_whole_one(mlx_checkpoints, tokenizer, pairs_file, name, kind):
    """Loss, rewards and every trainable gradient (the head's too when it trains) of a batch of
    pairs, with the head run over slices of 7 positions, against the whole logits."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxlocal.adapters.layers import add_adapters
    from mlxlocal.data import collate_pairs
    from mlxlocal.train.preference import Objective, batch_loss

    pairs, _ = _load(tokenizer, pairs_file, max_length=96)
    model, _ = load(mlx_checkpoints("llama"))
    mx.random.seed(0)
    if kind == "lora":
        add_adapters(model, "lora", 4, 2.0, 0.0, ["self_attn.q_proj", "mlp.down_proj"], [0, 1])
        for layer in model.layers:
            for m in (layer.self_attn.q_proj, layer.mlp.down_proj):
                m.lora_b = 0.1 * mx.random.normal(m.lora_b.shape)
    else:
        model.unfreeze()
    b = collate_pairs(pairs[:4], list(range(4)), 96)
    reference = -40 + 5 * mx.random.normal((8,))
    objective = Objective(name, beta=0.2, label_smoothing=0.1 if name != "orpo" else 0.0)

    def scored(chunk):
        def loss(*arrays):
            total, _, sums = batch_loss(model, objective, *arrays, chunk_size=chunk)
            return total, sums

        (total, sums), grads = nn.value_and_grad(model, loss)(
            b.tokens, b.weights, b.segments, reference
        )
        mx.eval(total, sums, grads)
        return total.item(), np.array(sums), dict(tree_flatten(grads))

    whole, chunked = scored(None), scored(7)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
    # The margin is a difference of sums of ~200: float32 leaves ~1e-5 of it.
    np.testing.assert_allclose(chunked[1], whole[1], rtol=0, atol=1e-6 * np.abs(whole[1]).max())
    grads, expected = chunked[2], whole[2]
    assert grads.keys() == expected.keys() and len(grads) > 0
    if kind == "full":
        assert any("embed_tokens" in k or "lm_head" in k for k in grads)
    scale = max(np.abs(np.array(g)).max() for g in expected.values())
    for key, g in expected.items():
        np.testing.assert_allclose(np.array(grads[key]), np.array(g), rtol=0, atol=1e-5 * scale)
