"""GGUF export and import, with llama.cpp itself (llama-cpp-python) as the reference."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import LLAMA3_ROPE, make_adapter, mlx_logits, probe_ids, sentencepiece_checkpoint

from mlxlocal import convert
from mlxlocal.checkpoint.gguf_names import permute_qk
from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.export.gguf import export_gguf, export_gguf_adapter
from mlxlocal.export.ollama import PROMPT, SYSTEM
from mlxlocal.gguf_import import convert_gguf

TEXTS = [
    "Hello world, the quick brown fox jumps!",
    "def add(a, b):\n    return a + b",
    "two  spaces, émoji 🙂 and Numbers: 12345",
    "<|user|>\nTranslate the sentence<|end|>\n",
]
F32_REL = 1e-4  # max |Δlogit| / max |logit|, F32 weights and F32 KV cache


@pytest.fixture(scope="module")
def llama_cpp():
    """llama_cpp, with weight repacking off: its repacked CPU kernels crash on our 64-wide toy
    tensors (llama.cpp's own quantizer output crashes the same way); real models are unaffected.
    """
    import llama_cpp

    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    yield llama_cpp
    llama_cpp.llama_cpp.llama_model_default_params = default


@pytest.fixture(scope="module")
def models(checkpoints, tmp_path_factory):
    """name → MLX checkpoint converted from a tiny HF checkpoint, built once per module."""
    root = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(arch: str, **kw):
        key = arch + "".join(f"-{k}" for k in sorted(kw))
        if key not in cache:
            cache[key] = convert(checkpoints(arch, **kw), root / key).out
        return cache[key]

    return get


def cpp_logits(llama_cpp, path, ids, lora=None):
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=128,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32 KV cache
        type_v=0,
        n_threads=2,
        lora_path=str(lora) if lora else None,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)]), llm


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f32_export_matches_mlx_in_llama_cpp(arch, models, llama_cpp, tmp_path):
    from mlx_lm import load

    src = models(arch)
    result = export_gguf(src, tmp_path / "m.gguf", type="f32")
    assert result.arch == ("qwen2" if arch == "qwen2" else "llama") and not result.warnings
    ids = probe_ids(48)
    ref = mlx_logits(src, ids)
    got, llm = cpp_logits(llama_cpp, result.out, ids)
    assert ref.std() > 0.5 and rel(got, ref) <= F32_REL
    _, tokenizer = load(str(src))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text)
    field = gguf.GGUFReader(result.out).fields["tokenizer.ggml.token_type"]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_quantized_export(qtype, models, llama_cpp, tmp_path):
    """The weights arrive exactly (checked through an F32 export of the GGUF's own weights);
    llama.cpp's CPU kernels then also round activations to 8 bits, hence the looser bound."""
    src = models("llama")
    path = export_gguf(src, tmp_path / "q.gguf", type=qtype).out
    same_weights = convert_gguf(path, tmp_path / "imported", dtype="float32").out
    ids = probe_ids(64)
    ref = mlx_logits(same_weights, ids)
    exact, _ = cpp_logits(
        llama_cpp, export_gguf(same_weights, tmp_path / "f.gguf", type="f32").out, ids
    )
    assert rel(exact, ref) <= F32_REL
    got, _ = cpp_logits(llama_cpp, path, ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85 and rel(got, ref) <= 0.1
    original = mlx_logits(src, ids)
    assert (got.argmax(-1) == original.argmax(-1)).mean() >= (0.85 if qtype == "q8_0" else 0.2)


def test_4bit_group32_repacks_losslessly_to_q4_1(checkpoints, tmp_path):
    from mlx_lm import convert as mlx_convert

    q4 = tmp_path / "q4"
    hf = str(checkpoints("llama"))
    mlx_convert(hf, str(q4), quantize=True, q_group_size=32, q_bits=4, dtype="float16")
    result = export_gguf(q4, tmp_path / "q4.gguf")
    assert result.type == "auto→q4_1" and not result.warnings
    weights = mx.load(str(q4 / "model.safetensors"))
    config = json.loads((q4 / "config.json").read_text())
    tensors = {t.name: t for t in gguf.GGUFReader(result.out).tensors}
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.Q4_1
    for name, gguf_name, heads in (
        ("model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight", config["num_attention_heads"]),
        ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", None),
        ("model.embed_tokens", "token_embd.weight", None),
    ):
        t = tensors[gguf_name]
        ours = mx.dequantize(
            weights[f"{name}.weight"],
            weights[f"{name}.scales"].astype(mx.float32),
            weights[f"{name}.biases"].astype(mx.float32),
            group_size=32,
            bits=4,
        )
        theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        theirs = permute_qk(theirs, heads, inverse=True) if heads else theirs
        assert np.array_equal(np.array(ours), theirs), name
    # …and back: importing the Q4_1 file gives MLX's packed weights, bit for bit.
    back = mx.load(
        str(convert_gguf(result.out, tmp_path / "back", dtype="float16").out / "model.safetensors")
    )
    assert all(np.array_equal(np.array(weights[k]), np.array(back[k])) for k in weights)

    mlx_convert(hf, str(tmp_path / "q8"), quantize=True, q_bits=8, dtype="float16")
    warned = export_gguf(tmp_path / "q8", tmp_path / "q8.gguf").warnings
    assert any("re-quantized to q8_0" in w for w in warned)


def test_llama3_rope_scaling_writes_rope_freqs(models, llama_cpp, tmp_path):
    src = models("llama", rope_parameters=LLAMA3_ROPE)
    path = export_gguf(src, tmp_path / "m.gguf", type="f32").out
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    assert factors.shape == (8,) and factors.max() == 8.0 and factors.min() == 1.0
    ids = probe_ids(96)
    assert rel(cpp_logits(llama_cpp, path, ids)[0], mlx_logits(src, ids)) <= F32_REL


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0"])
def test_llama3_gguf_imports_with_its_rope_scaling(qtype, models, llama_cpp, tmp_path):
    """A Llama 3.2-style GGUF (tied embeddings, rope_freqs as llama.cpp's converter writes
    them) imports with the rope scaling recovered, and gives llama.cpp's logits on that file.
    Imported as float32, so the only gap is llama.cpp's own rounding of activations (F16 for
    F16 weights, 8 bits for Q8_0/Q4_0)."""
    src = models("llama", rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
    path = export_gguf(src, tmp_path / "m.gguf", type=qtype).out
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    result = convert_gguf(path, tmp_path / "imported", dtype="float32")
    scaling = json.loads((result.out / "config.json").read_text())["rope_scaling"]
    expected = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert {k: scaling[k] for k in expected} == expected
    ids = probe_ids(96)
    theirs, _ = cpp_logits(llama_cpp, path, ids)
    ours = mlx_logits(result.out, ids)
    # Measured: f32 ~1e-6, f16 1.5e-3, q8_0 0.051, q4_0 0.038 (top-1 ≥ 92 %); 0.1 as in
    # test_quantized_export.
    bound = {"f32": F32_REL, "f16": 3e-3, "q8_0": 0.1, "q4_0": 0.1}[qtype]
    gap = rel(ours, theirs)
    assert gap <= bound and (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
    # Without the scaling (what importing rope_freqs as plain RoPE would give) it is far off.
    config = json.loads((result.out / "config.json").read_text())
    del config["rope_scaling"]
    (result.out / "config.json").write_text(json.dumps(config))
    assert rel(mlx_logits(result.out, ids), theirs) > max(5 * gap, 0.5)  # measured 1.17


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_rope_freqs_of_real_llama3_configs_give_their_parameters(factor):
    """Llama 3.1 (factor 8) and 3.2 (factor 32) sizes: the divisors transformers computes for
    them, as llama.cpp stores them, give back the exact parameters."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mlxlocal.gguf_import import _llama3_rope

    real = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    real["original_max_position_embeddings"] = 8192
    parameters = {"rope_type": "llama3", "rope_theta": 500000.0, **real}
    config = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, head_dim=128, rope_parameters=parameters
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 500000.0 ** -(torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    f32 = gguf.GGMLQuantizationType.F32
    tensor = SimpleNamespace(data=(plain / inv_freq).numpy(), tensor_type=f32)
    ours = {"head_dim": 128, "rope_theta": 500000.0, "max_position_embeddings": 131072}
    _llama3_rope(ours, tensor, "x.gguf")
    assert {k: ours["rope_scaling"][k] for k in real} == real


def test_rope_freqs_that_are_not_llama3_are_refused(models, tmp_path):
    good = export_gguf(models("llama", rope_parameters=LLAMA3_ROPE), tmp_path / "m.gguf").out
    ramp = np.linspace(1.0, 3.0, 8, dtype=np.float32)
    _rewrite(good, tmp_path / "bad.gguf", change={"rope_freqs.weight": ramp})
    with pytest.raises(MlxLocalError, match="not Llama 3 rope scaling"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_omit_output_weight(models, llama_cpp, tmp_path):
    src = models("qwen2", tie_word_embeddings=True)
    path = export_gguf(src, tmp_path / "m.gguf", type="f32").out
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    ids = probe_ids(32)
    assert rel(cpp_logits(llama_cpp, path, ids)[0], mlx_logits(src, ids)) <= F32_REL


def test_adapters_fused_and_as_gguf_adapter(models, llama_cpp, tmp_path):
    src = models("llama")
    lora = make_adapter(
        src, tmp_path / "lora", keys=["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
    )
    ids = probe_ids(48)
    ours = mlx_logits(src, ids, lora)
    assert np.abs(ours - mlx_logits(src, ids)).max() > 0.05
    fused = export_gguf(src, tmp_path / "fused.gguf", adapter=lora, type="f32").out
    fused_logits, _ = cpp_logits(llama_cpp, fused, ids)
    assert rel(fused_logits, ours) <= F32_REL
    base = export_gguf(src, tmp_path / "base.gguf", type="f32").out
    adapter = export_gguf_adapter(lora, src, tmp_path / "lora.gguf").out
    fields = gguf.GGUFReader(adapter).fields
    assert fields["general.type"].contents() == "adapter"
    assert rel(cpp_logits(llama_cpp, base, ids, lora=adapter)[0], fused_logits) <= F32_REL

    dora = make_adapter(src, tmp_path / "dora", kind="dora", keys=["self_attn.v_proj"])
    fused = export_gguf(src, tmp_path / "dora.gguf", adapter=dora, type="f32").out
    assert rel(cpp_logits(llama_cpp, fused, ids)[0], mlx_logits(src, ids, dora)) <= F32_REL
    with pytest.raises(MlxLocalError, match="LoRA only"):
        export_gguf_adapter(dora, src, tmp_path / "dora-adapter.gguf")
    assert not (tmp_path / "dora-adapter.gguf").exists()


def test_sentencepiece_tokenizer(checkpoints, llama_cpp, tmp_path):
    from mlx_lm import load

    hf = sentencepiece_checkpoint(checkpoints("llama"), tmp_path / "hf")
    src = convert(hf, tmp_path / "mlx").out
    path = export_gguf(src, tmp_path / "m.gguf", type="f32").out
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    _, ours = load(str(src))
    _, imported = load(str(convert_gguf(path, tmp_path / "back").out))
    for text in TEXTS[:3]:
        ids = ours.encode(text)
        assert ids[0] == 1 and llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        assert imported.encode(text) == ids and imported.decode(ids[1:]) == text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_import_of_our_export_gives_the_same_model(arch, models, tmp_path):
    from mlx_lm import load

    src = models(arch)
    path = export_gguf(src, tmp_path / "m.gguf", type="f32").out
    result = convert_gguf(path, tmp_path / "back")
    assert result.model_type == arch and result.dtype == "float32"
    ids = probe_ids(48)
    assert np.array_equal(mlx_logits(result.out, ids), mlx_logits(src, ids))
    (_, a), (_, b) = load(str(src)), load(str(result.out))
    assert all(a.encode(t) == b.encode(t) for t in TEXTS)
    assert a.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        b.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    )


def _rewrite(src, out, arch=None, int_tensor=None, change=None):
    """Copy a GGUF, optionally renaming its architecture, turning a tensor into I32 or
    replacing tensors (`change`: name → array)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, arch or reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(
            name.replace("llama.", f"{arch}.") if arch else name, value, field.types[0], sub
        )
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name == int_tensor:
            data = data.astype(np.int32)
        data = (change or {}).get(t.name, data)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_bad_gguf_files_are_refused(models, tmp_path):
    good = export_gguf(models("llama"), tmp_path / "m.gguf", type="f32").out
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {
        "truncated|not a readable": truncated,
        "architecture 'gpt2' is not supported": _rewrite(good, tmp_path / "a.gguf", arch="gpt2"),
        "GGML type I32": _rewrite(good, tmp_path / "t.gguf", int_tensor="blk.0.ffn_up.weight"),
        "GGUF adapter, not a model": export_gguf_adapter(
            make_adapter(models("llama"), tmp_path / "lora"), models("llama"), tmp_path / "l.gguf"
        ).out,
    }
    for message, path in cases.items():
        with pytest.raises(MlxLocalError, match=message):
            convert_gguf(path, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    other = tmp_path / "other"  # a family mlxlocal has no GGUF spec for
    shutil.copytree(models("llama"), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "starcoder2"}))
    with pytest.raises(MlxLocalError, match="not supported yet"):
        export_gguf(other, tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ollama_folder_and_cli(models, tmp_path):
    from transformers import AutoTokenizer

    src = models("llama")
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "ollama", str(src), str(tmp_path / "ollama")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|end|>"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # Ollama fills {{ .System }}, {{ .Prompt }}: the result is the chat template's own rendering.
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    filled = template.replace("{{ if .System }}", "").replace("{{ end }}", "")
    filled = filled.replace("{{ .System }}", SYSTEM).replace("{{ .Prompt }}", PROMPT)
    assert filled == expected + "{{ .Response }}<|end|>\n"
    assert (tmp_path / "ollama" / "model.gguf").exists()

    result = runner.invoke(
        cli, ["export", "gguf", str(src), str(tmp_path / "x.gguf"), "--type", "q5_k"]
    )
    assert result.exit_code != 0 and "q5_k" in result.output
    for verb in (["export", "gguf"], ["export", "peft"], ["import", "peft"]):
        assert runner.invoke(cli, [*verb, "--help"]).exit_code == 0


def test_convert_command_imports_gguf_and_the_library_points_there(models, tmp_path):
    path = export_gguf(models("llama"), tmp_path / "m.gguf", type="f32").out
    with pytest.raises(MlxLocalError, match="mlxlocal.gguf_import.convert_gguf"):
        convert(path, tmp_path / "library")
    result = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "converted llama" in result.output
    assert (tmp_path / "cli" / "model.safetensors").exists()
