"""`quantize`: real bits per weight, honoured layer plans, measured cost, outputs mlx-lm opens."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import mlx_logits
from safetensors.numpy import load_file, save_file

from mlxlocal import convert, info, quantize
from mlxlocal.checkpoint.safetensors import read_header
from mlxlocal.cli import cli
from mlxlocal.quality import load_tokenizer, token_parts


def mlx_lm_load(path):
    from mlx_lm import load

    model, _ = load(str(path))
    return model


def header(path) -> dict:
    table = {}
    for f in sorted(path.glob("model*.safetensors")):
        table.update(read_header(f)[0])
    return table


def test_uniform_bits_per_weight_is_real_and_near_the_request(checkpoints, tmp_path):
    from mlx_lm.utils import compute_bits_per_weight

    result = quantize(checkpoints("llama"), tmp_path / "q", dtype="float16", evaluate=False)
    report = result.report
    # 4 bits + a float16 scale and bias per 64 weights = 4.5; norms add a little.
    assert report["requested_bits_per_weight"] == 4.5
    assert abs(report["bits_per_weight"] - 4.5) <= 0.1
    data = info(tmp_path / "q")
    assert data["quantization"]["bits_per_weight"] == report["bits_per_weight"]
    assert (data["quantization"]["bits"], data["quantization"]["group_size"]) == (4, 64)
    assert data["quantization"]["per_layer_overrides"] == 0
    stored = header(tmp_path / "q").values()
    assert report["size_after_bytes"] == sum(
        e["data_offsets"][1] - e["data_offsets"][0] for e in stored
    )
    model = mlx_lm_load(tmp_path / "q")
    assert report["bits_per_weight"] == pytest.approx(compute_bits_per_weight(model), abs=1e-3)
    assert json.loads((tmp_path / "q" / "quantization_report.json").read_text()) == report
    assert report["eval"] is None
    # Each layer's reported error is ||W - Ŵ|| / ||W|| of what was written.
    source = load_file(str(checkpoints("llama") / "model.safetensors"))
    written = mx.load(str(tmp_path / "q" / "model.safetensors"))
    for row in report["layers"]:
        p = row["path"]
        w = source[f"{p}.weight"].astype(np.float16).astype(np.float64)
        parts = [written[f"{p}.{leaf}"] for leaf in ("weight", "scales", "biases")]
        restored = np.array(mx.dequantize(*parts, 64, 4).astype(mx.float32), dtype=np.float64)
        assert row["error"] == pytest.approx(np.linalg.norm(w - restored) / np.linalg.norm(w), 1e-4)


@pytest.mark.parametrize(
    "mode, nominal", [("mxfp4", 4 + 8 / 32), ("nvfp4", 4 + 8 / 16), ("mxfp8", 8 + 8 / 32)]
)
def test_float_modes(mode, nominal, checkpoints, tmp_path):
    from mlx_lm.utils import dequantize_model

    src = checkpoints("llama")
    report = quantize(src, tmp_path / "q", mode=mode, dtype="float16", evaluate=False).report
    assert report["requested_bits_per_weight"] == nominal
    assert abs(report["bits_per_weight"] - nominal) <= 0.1
    assert {row["mode"] for row in report["layers"]} == {mode}
    model = mlx_lm_load(tmp_path / "q")
    quantized = mlx_logits(model)
    # The float formats go through a different kernel than dequantize + matmul: 1e-5 apart.
    np.testing.assert_allclose(mlx_logits(dequantize_model(model)), quantized, atol=1e-5)


def test_quantized_logits_equal_its_dequantized_copy(checkpoints, tmp_path):
    from mlx_lm.utils import dequantize_model

    quantize(checkpoints("llama"), tmp_path / "q", bits=3, group_size=32, evaluate=False)
    model = mlx_lm_load(tmp_path / "q")
    quantized = mlx_logits(model)
    assert np.array_equal(mlx_logits(dequantize_model(model)), quantized)


def test_kl_is_measured_against_transformers_and_falls_with_more_bits(checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = checkpoints("llama")
    reports = {b: quantize(src, tmp_path / f"q{b}", bits=b).report for b in (2, 3, 4, 8)}
    kls = [reports[b]["eval"]["mean_kl"] for b in (2, 3, 4, 8)]
    assert kls == sorted(kls, reverse=True) and len(set(kls)) == 4, kls
    assert reports[8]["eval"]["top1_agreement"] > reports[2]["eval"]["top1_agreement"]

    # The same measurement done independently: transformers at fp32 as the unquantized model.
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    windows = token_parts(load_tokenizer(src), None, 256, 512)[1]
    model = mlx_lm_load(tmp_path / "q4")
    kl_sum, nll_sum, n = 0.0, 0.0, 0
    for ids in windows:
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        cand = torch.log_softmax(torch.from_numpy(mlx_logits(model, ids)).double(), -1)
        kl_sum += (ref.exp() * (ref - cand)).sum().item()
        nll_sum -= ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        n += len(ids)
    ev = reports[4]["eval"]
    assert ev["tokens"] == n
    assert ev["mean_kl"] == pytest.approx(kl_sum / n, rel=1e-3)
    assert ev["perplexity_before"] == pytest.approx(np.exp(nll_sum / (n - len(windows))), rel=1e-4)


def test_non_dividing_layer_takes_a_smaller_group_and_says_so(checkpoints, tmp_path):
    """intermediate_size=96: down_proj's width is no multiple of 64 (mlx-lm would skip it)."""
    from mlx_lm.convert import convert as mlx_convert
    from mlx_lm.utils import compute_bits_per_weight, dequantize_model

    report = quantize(checkpoints("llama", intermediate_size=96), tmp_path / "q").report
    rows = {row["path"]: row for row in report["layers"]}
    down = rows["model.layers.0.mlp.down_proj"]
    assert (down["bits"], down["group_size"]) == (4, 32)
    assert "width 96 is not a multiple of 64: group size 32" in down["note"]
    table = header(tmp_path / "q")
    assert table["model.layers.0.mlp.down_proj.weight"]["dtype"] == "U32"
    assert table["model.layers.0.mlp.down_proj.scales"]["shape"] == [64, 96 // 32]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["model.layers.1.mlp.down_proj"]["group_size"] == 32
    model = mlx_lm_load(tmp_path / "q")
    assert report["bits_per_weight"] == pytest.approx(compute_bits_per_weight(model), abs=1e-3)
    quantized = mlx_logits(model)
    assert np.array_equal(mlx_logits(dequantize_model(model)), quantized)
    # mlx-lm's own quantizer leaves the layer at 32 bits without a word.
    convert(checkpoints("llama", intermediate_size=96), tmp_path / "fp")
    mlx_convert(str(tmp_path / "fp"), str(tmp_path / "mlx-lm"), quantize=True, q_bits=4)
    skipped = info(tmp_path / "mlx-lm")["quantization"]["bits_per_weight"]
    assert report["bits_per_weight"] < skipped - 1


def test_layer_no_group_divides_is_kept_and_said(checkpoints, tmp_path):
    report = quantize(
        checkpoints("llama", intermediate_size=80), tmp_path / "q", evaluate=False
    ).report
    down = next(r for r in report["layers"] if r["path"] == "model.layers.0.mlp.down_proj")
    assert down["mode"] == "unquantized" and "kept at full precision" in down["note"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.down_proj"] is False
    assert header(tmp_path / "q")["model.layers.0.mlp.down_proj.weight"]["dtype"] == "F32"
    mlx_lm_load(tmp_path / "q")


def test_rules_are_honoured_layer_by_layer(checkpoints, tmp_path):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("'mlp\\.(gate|up)_proj': 3\nlm_head: 2\n")
    result = CliRunner().invoke(
        cli,
        [
            "quantize",
            str(checkpoints("llama")),
            str(tmp_path / "q"),
            "--rule",
            "lm_head=8",  # first match wins over the file's lm_head rule
            "--rule",
            r"layers\.1\.mlp=2/32",
            "--rule",
            "v_proj=16",
            "--rules",
            str(rules_file),
            "--no-eval",
        ],
    )
    assert result.exit_code == 0, result.output
    expected = {
        "lm_head": (8, 64, "affine"),
        "model.embed_tokens": (4, 64, "affine"),
        "model.layers.0.mlp.gate_proj": (3, 64, "affine"),
        "model.layers.0.mlp.down_proj": (4, 64, "affine"),
        "model.layers.1.mlp.gate_proj": (2, 32, "affine"),
        "model.layers.1.mlp.down_proj": (2, 32, "affine"),
        "model.layers.0.self_attn.q_proj": (4, 64, "affine"),
    }
    table = header(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    for path, (bits, group, mode) in expected.items():
        shape = table[f"{path}.weight"]["shape"]
        scales = table[f"{path}.scales"]["shape"]
        width = scales[-1] * group
        assert shape[-1] == width * bits // 32 and table[f"{path}.weight"]["dtype"] == "U32"
        spec = config.get(path, config)
        assert (spec["bits"], spec["group_size"], spec["mode"]) == (bits, group, mode), path
    for i in (0, 1):
        path = f"model.layers.{i}.self_attn.v_proj"
        assert config[path] is False and table[f"{path}.weight"]["dtype"] == "F32"
        assert f"{path}.scales" not in table
    assert "rule lm_head" in result.output and "2-bit affine g32" in result.output
    mlx_lm_load(tmp_path / "q")


@pytest.mark.parametrize(
    "arch, high", [("llama", {"model.embed_tokens", "lm_head"}), ("gemma2", {"model.embed_tokens"})]
)
def test_keep_embeddings_preset_follows_the_family_spec(arch, high, checkpoints, tmp_path):
    report = quantize(
        checkpoints(arch), tmp_path / "q", preset="keep-embeddings", evaluate=False
    ).report
    at6 = {row["path"] for row in report["layers"] if row["bits"] == 6}
    assert at6 == high
    mlx_lm_load(tmp_path / "q")


def test_mixed_preset_gives_sensitive_projections_more_bits(checkpoints, tmp_path):
    report = quantize(
        checkpoints("llama", num_hidden_layers=4),
        tmp_path / "q",
        bits=3,
        preset="mixed",
        evaluate=False,
    ).report
    at6 = {row["path"] for row in report["layers"] if row["bits"] == 6}
    # 4 layers: the last eighth is layer 3, every third from the first eighth is layer 2.
    sensitive = {
        f"model.layers.{i}.{p}" for i in (2, 3) for p in ("self_attn.v_proj", "mlp.down_proj")
    }
    assert at6 == {"model.embed_tokens", "lm_head"} | sensitive
    assert {row["bits"] for row in report["layers"]} == {3, 6}
    mlx_lm_load(tmp_path / "q")


def _with_outliers(src, dst, name):
    """A copy whose `name` has one large weight per group of 64: 4 bits then lose the rest."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    w = tensors[name].copy()
    w[:, ::64] *= 40
    tensors[name] = w
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_target_bpw_hits_its_target_and_beats_uniform(checkpoints, tmp_path):
    sensitive = "model.layers.1.self_attn.o_proj"
    src = _with_outliers(
        checkpoints("llama", num_hidden_layers=3), tmp_path / "src", sensitive + ".weight"
    )
    uniform = quantize(src, tmp_path / "uniform", bits=4).report
    target = uniform["bits_per_weight"]
    chosen = quantize(src, tmp_path / "target", target_bpw=target).report
    assert abs(chosen["bits_per_weight"] - target) <= 0.1
    assert chosen["bits_per_weight"] == info(tmp_path / "target")["quantization"]["bits_per_weight"]
    assert chosen["eval"]["mean_kl"] < uniform["eval"]["mean_kl"]
    rows = {row["path"]: row for row in chosen["layers"]}
    assert rows[sensitive]["bits"] >= 6
    mlx_lm_load(tmp_path / "target")


def test_one_path_from_hf_and_from_mlx_and_through_convert(checkpoints, tmp_path):
    src = checkpoints("qwen2")
    convert(src, tmp_path / "fp")
    quantize(src, tmp_path / "from-hf", bits=4, evaluate=False)
    quantize(tmp_path / "fp", tmp_path / "from-mlx", bits=4, evaluate=False)
    result = CliRunner().invoke(
        cli, ["convert", str(src), str(tmp_path / "conv"), "--quantize", "--bits", "4", "--no-eval"]
    )
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.output
    a = load_file(str(tmp_path / "from-hf" / "model.safetensors"))
    for other in ("from-mlx", "conv"):
        b = load_file(str(tmp_path / other / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), other
    config = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert config["mlxlocal"]["source"] == str(src)


def test_cli_report_info_and_generation(checkpoints, tmp_path):
    from mlx_lm import generate, load

    out = tmp_path / "q"
    result = CliRunner().invoke(cli, ["quantize", str(checkpoints("llama")), str(out)])
    assert result.exit_code == 0, result.output
    for needle in ("counted from the file", "perplexity", "mean KL", "top-1", "rel. error"):
        assert needle in result.output
    report = json.loads((out / "quantization_report.json").read_text())
    assert f"{report['bits_per_weight']:.3f}" in result.output
    shown = CliRunner().invoke(cli, ["info", str(out)])
    assert "4-bit affine, group size 64" in shown.output
    assert f"{report['bits_per_weight']} bits/weight" in shown.output
    model, tokenizer = load(str(out))
    text = generate(model, tokenizer, "The quick brown fox", max_tokens=4, verbose=False)
    assert isinstance(text, str)
    generated = CliRunner().invoke(cli, ["generate", str(out), "-p", "Hello", "--max-tokens", "4"])
    assert generated.exit_code == 0, generated.output
