"""Converted models give transformers' logits (the reference), per architecture and dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ARCHS, LLAMA3_ROPE, hf_logits, mlx_logits, probe_ids

from mlxlocal import convert
from mlxlocal.verify import compare_logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_logits_match_transformers(arch, checkpoints, tmp_path):
    src = checkpoints(arch)
    result = convert(src, tmp_path / "out")
    assert result.dtype == "float32"
    ids = probe_ids()
    ref, got = hf_logits(src, ids), mlx_logits(tmp_path / "out", ids)
    assert got.shape == ref.shape
    assert np.abs(ref - got).max() <= 1e-4
    assert ref.std() > 0.5  # logits far from uniform, so the comparison means something


@pytest.mark.parametrize("dtype,max_abs", [("float16", 0.05), ("bfloat16", 0.3)])
def test_half_precision_within_tolerance(dtype, max_abs, checkpoints, tmp_path):
    src = checkpoints("llama")
    convert(src, tmp_path / "out", dtype=dtype)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype
    ids = probe_ids(64)
    stats = compare_logits(hf_logits(src, ids), mlx_logits(tmp_path / "out", ids))
    assert stats["max_abs_logit_diff"] <= max_abs
    assert stats["top1_agreement"] >= 0.95


def test_rope_theta_from_rope_parameters(checkpoints, tmp_path):
    """transformers 5 writes rope_parameters; without the fix mlx-lm would use theta 10000."""
    src = checkpoints("llama")
    raw = json.loads((src / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == 50000.0
    result = convert(src, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_theta"] == 50000.0
    assert any("rope_theta" in n for n in result.notes)
    # The drift is real: the raw config (theta falls back to 10000) gives different logits.
    config.pop("rope_theta")
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    ids = probe_ids()
    assert np.abs(hf_logits(src, ids) - mlx_logits(tmp_path / "out", ids)).max() > 1e-2


def test_ignored_sliding_window_is_reported(checkpoints, tmp_path):
    """mlx-lm's gemma2 has no window and its llama (Mistral) needs a full-attention layer."""
    for arch in ("gemma2", "mistral"):
        result = convert(checkpoints(arch), tmp_path / arch)
        assert any("sliding_window=128" in w for w in result.warnings), arch
    assert not convert(checkpoints("llama"), tmp_path / "llama").warnings


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {"rope_parameters": LLAMA3_ROPE}),
        (
            "phi3",
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 20000.0,
                    "partial_rotary_factor": 0.5,
                }
            },
        ),
    ],
    ids=["llama3-rope-scaling", "phi3-partial-rotary"],
)
def test_rope_parameters_beyond_theta(arch, overrides, checkpoints, tmp_path):
    """rope scaling and partial rotary factors also live in rope_parameters in transformers 5."""
    src = checkpoints(arch, **overrides)
    raw = json.loads((src / "config.json").read_text())
    assert "rope_scaling" not in raw and "partial_rotary_factor" not in raw
    convert(src, tmp_path / "out")
    ids = probe_ids(48)
    ref = hf_logits(src, ids)
    assert np.abs(ref - mlx_logits(tmp_path / "out", ids)).max() <= 1e-4


def test_missing_tie_word_embeddings_is_set_from_the_weights(checkpoints, tmp_path):
    """mlx-lm's Llama defaults to tied embeddings, HF's to untied: the weights decide."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoints("llama"), src)
    config = json.loads((src / "config.json").read_text())
    del config["tie_word_embeddings"]
    (src / "config.json").write_text(json.dumps(config))
    result = convert(src, tmp_path / "out")
    assert any("tie_word_embeddings" in n for n in result.notes)
    ids = probe_ids()
    ref = hf_logits(checkpoints("llama"), ids)
    assert np.abs(ref - mlx_logits(tmp_path / "out", ids)).max() <= 1e-4
