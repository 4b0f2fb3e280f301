"""Config values and tensor dtypes mlx-lm would misread: refused by name, or converted right.

A wrong JSON type in config.json, a malformed rope block or an FP8 tensor used to convert
without a word into a model that is wrong (lm_head dropped, rope base 10000, raw uint8 bytes as
weights) or crashes at the first token.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from test_bad_input import assert_clean_failure, run

from mlxlocal import convert, info

# (config key, corrupt value, what the error line names)
BAD_VALUES = [
    ("tie_word_embeddings", "no", "tie_word_embeddings"),
    ("rope_theta", "fast", "rope_theta"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps"),
    ("attention_bias", 1, "attention_bias"),
    ("max_position_embeddings", 256.5, "max_position_embeddings"),
    ("layer_types", "full_attention", "layer_types"),
    ("model_type", "cache", "supported: "),
    ("eos_token_id", "</s>", "eos_token_id"),
    ("eos_token_id", [2, "x"], "eos_token_id"),
    ("rope_parameters", "fast", "rope_parameters"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4}, "has no factor"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "fast"}, "rope_theta"),
    ("rope_parameters", {"full_attention": {"rope_type": "yarn"}}, "has no factor"),
    ("rope_scaling", {"rope_type": "warp", "factor": 2.0}, "'warp'"),
    ("rope_scaling", {"type": "dynamic"}, "has no factor"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "has no low_freq_factor"),
    ("rope_scaling", {"type": "linear", "factor": "2"}, "factor"),
    ("rope_scaling", [1, 2], "rope_scaling"),
    ("rope_scaling", {"type": "linear", "factor": 0}, "factor is 0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps is NaN"),
    ("rope_parameters", {"rope_theta": float("inf")}, "rope_theta is Infinity"),
]
IDS = [f"{key}={json.dumps(value)[:30]}" for key, value, _ in BAD_VALUES]


def _corrupt(src, dst, key, value):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("key,value,needle", BAD_VALUES, ids=IDS)
def test_bad_config_value_refused_by_convert_and_info(key, value, needle, checkpoints, tmp_path):
    src = _corrupt(checkpoints("llama"), tmp_path / "src", key, value)
    out = tmp_path / "out"
    assert_clean_failure(run("convert", src, out), needle, out=out)
    assert_clean_failure(run("info", src), needle)


@pytest.mark.parametrize(
    "key,value,needle",
    [BAD_VALUES[i] for i in (0, 1, 6, 7, 13, 18)],
    ids=[IDS[i] for i in (0, 1, 6, 7, 13, 18)],
)
def test_bad_config_value_refused_by_load(key, value, needle, tiny_mlx, tmp_path):
    model = _corrupt(tiny_mlx, tmp_path / "model", key, value)
    assert_clean_failure(run("generate", model, "-p", "hi", "--max-tokens", "2"), needle)


def test_good_rope_blocks_still_convert(checkpoints, tmp_path):
    """The checks refuse only what is malformed: a linear block with its factor converts."""
    src = _corrupt(
        checkpoints("llama"),
        tmp_path / "src",
        "rope_parameters",
        {"rope_type": "linear", "rope_theta": 20000, "factor": 2.0},
    )
    config = json.loads((convert(src, tmp_path / "out").out / "config.json").read_text())
    assert config["rope_theta"] == 20000
    assert config["rope_scaling"]["factor"] == 2.0


def test_info_of_all_empty_tensors(checkpoints, tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "empty"
    src.mkdir()
    shutil.copy(checkpoints("llama") / "config.json", src)
    save_file(
        {"a": np.zeros((0, 4), np.float32), "b": np.zeros(0, np.float16)}, src / "model.safetensors"
    )
    data = info(src)
    assert data["parameters"] == 0 and data["dtypes"] == {}
    result = run("info", src)
    assert result.exit_code == 0, result.output


# FP8 ---------------------------------------------------------------------------------------

BLOCK = (48, 48)  # ragged against 64 and 128, so partial blocks are exercised
FP8_MAX = 448.0


def _to_fp8(w, scale):
    import torch

    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _make_fp8_checkpoint(src, dst):
    """`src` with every linear layer stored as F8_E4M3, each family in one shipped layout:
    attention with 48×48 block scales (weight_scale_inv), gate/up with one scale per output row
    and down with one per tensor (weight_scale, plus an activation input_scale). Returns the
    float weights the FP8 values and their scales stand for."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    reference = {}
    for name, w in list(tensors.items()):
        module = name.rpartition(".")[0]
        if not name.endswith("proj.weight"):
            continue
        w = w.float()
        m, n = w.shape
        if "self_attn" in name:
            bm, bn = BLOCK
            blocks = torch.nn.functional.pad(w, (0, -n % bn, 0, -m % bm)).abs()
            amax = blocks.reshape(-(-m // bm), bm, -(-n // bn), bn).amax(dim=(1, 3))
            scale = amax / FP8_MAX
            full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:m, :n]
            tensors[f"{module}.weight_scale_inv"] = scale
        elif "down_proj" in name:
            scale = full = w.abs().max() / FP8_MAX
            tensors[f"{module}.weight_scale"] = scale.reshape(1)
            tensors[f"{module}.input_scale"] = torch.ones(1)
        else:
            scale = full = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
            tensors[f"{module}.weight_scale"] = scale
        tensors[name] = _to_fp8(w, full)
        reference[name] = (tensors[name].float() * full).numpy()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (dst / "config.json").write_text(json.dumps(config))
    return reference


def test_fp8_checkpoint_converts_to_its_dequantized_weights(checkpoints, tmp_path):
    from mlxlocal.models import load

    reference = _make_fp8_checkpoint(checkpoints("llama"), tmp_path / "fp8")
    result = convert(tmp_path / "fp8", tmp_path / "out", dtype="float32")
    weights = {}
    for f in sorted(result.out.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    assert not [k for k in weights if "scale" in k]
    assert len(reference) == 14  # 7 linear layers in each of the 2 blocks
    for name, expected in reference.items():
        got = weights[name]
        assert got.dtype == mx.float32
        # fp8 value × scale, both exact in float32: only the product's rounding may differ.
        np.testing.assert_allclose(np.array(got), expected, rtol=1e-6, atol=0, err_msg=name)
    config = json.loads((result.out / "config.json").read_text())
    assert "quantization_config" not in config
    assert any("FP8" in note for note in result.notes)
    load(result.out)  # mlx-lm takes it as a plain float model


def _retype(src, dst, name, dtype):
    """`src` with tensor `name` stored as torch `dtype` (same shape, values cast)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "dtype,needle",
    [
        ("float8_e4m3fn", "no weight_scale_inv or weight_scale"),
        ("float8_e5m2", "F8_E5M2"),
        ("int32", "stored as int32"),
        ("bool", "stored as bool"),
        ("uint8", "stored as uint8"),
    ],
)
def test_weight_in_a_dtype_without_floats_is_refused(dtype, needle, checkpoints, tmp_path):
    import torch

    name = "model.layers.0.mlp.down_proj.weight"
    src = _retype(checkpoints("llama"), tmp_path / "src", name, getattr(torch, dtype))
    out = tmp_path / "out"
    assert_clean_failure(run("convert", src, out), needle, name, out=out)


def test_fp8_scale_of_the_wrong_shape_is_refused(checkpoints, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    _make_fp8_checkpoint(checkpoints("llama"), tmp_path / "fp8")
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    tensors[name] = torch.ones(1, 1)
    save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_clean_failure(run("convert", tmp_path / "fp8", out), name, out=out)
