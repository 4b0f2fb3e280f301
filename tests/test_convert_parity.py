"""Converted models give transformers' logits (the reference), per architecture and dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ARCHS, hf_logits, mlx_logits, probe_ids

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
