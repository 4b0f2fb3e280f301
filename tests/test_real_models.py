"""Every built-in recipe's model, as its real config (tests/real_models.py says what shrinks),
converts to transformers' logits, quantizes as mlx-lm does, generates what transformers'
greedy decoding gives through its chat template, and exports to a GGUF llama.cpp runs with
transformers' logits. Each carries its real vocabulary (real_models.REAL_VOCAB) at its real size
and ids: it tokenizes as the real tokenizer (llama.cpp's `.out` ids of the real HF tokenizers;
SentencePiece itself for Mistral v0.3 and Gemma 2, and Gemma's published ids), and
generate/chat stop at the model's real end-of-turn tokens.

Each model is built, converted and loaded once per module (`real`: transformers model, tokenizers
and reference logits included); every test reads that one copy and writes its own outputs."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import hf_logits, rig_end_of_turn
from real_models import (
    MODELS,
    REAL_VOCAB,
    VOCAB,
    gemma_model_proto,
    make_real_checkpoint,
    real_config,
)
from test_llama_vocab import cases

from mlxlocal import convert
from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.export.gguf import export_gguf
from mlxlocal.generate import generate, load_model
from mlxlocal.models import load, load_tokenizer
from mlxlocal.quantize import quantize

FP32 = 1e-4  # max |Δlogit| against transformers, fp32
GGUF_REL = 1e-4  # max |Δlogit| / max |logit|, F32 GGUF and KV cache (as tests/test_gguf.py)
# …except where llama.cpp's CPU GELU (Gemma's activation) reads an fp16 table: 1.6e-4 measured.
GGUF_REL_GELU = 1e-3
# One model per vocabulary (the other sizes of a family ship the same tokenizer and template).
REAL = ["Llama-3.2-1B-Instruct", "Qwen2.5-0.5B-Instruct", "Phi-3.5-mini-instruct"]
REAL += ["Mistral-7B-Instruct-v0.3", "gemma-2-2b-it"]
MISTRAL = VOCAB / "mistral-v0.3-tokenizer.model"
# family → (the stop set: tokenizer EOS ∪ generation_config.json's eos ids ∪ the template's end
# of turn, all at their real ids; the id that ends an assistant turn in the template).
STOPS = {
    "llama-bpe": ({128001, 128008, 128009}, 128009),  # <|eot_id|>
    "qwen2": ({151643, 151645}, 151645),  # <|im_end|>
    "phi-3": ({32000, 32001, 32007}, 32007),  # <|end|>
    "mistral": ({2}, 2),  # </s>
    "gemma": ({1, 107}, 107),  # <eos>, <end_of_turn>
}
# Gemma's own tokenizer (google/gemma-2b, the tokenizer.model Gemma 2 ships too) on texts whose
# ids transformers' tests publish (huggingface/transformers
# tests/models/gemma/test_tokenization_gemma.py @ 00c2d51cbf9ce2659637acdf8133014f56af0064), BOS
# included.
GEMMA_IDS = {
    "This is a test": [2, 1596, 603, 476, 2121],
    "A sample test": [2, 235280, 6453, 2121],
    "生活的真谛是": [2, 122182, 235710, 245467, 235427],
    "Hi  Hello": [2, 2151, 139, 4521],
    "Hi   Hello": [2, 2151, 140, 4521],
    "": [2],
    " ": [2, 235248],
    "  ": [2, 139],
    " Hello": [2, 25957],
    "The quick brown fox jumps over the lazy dog.": [
        *[2, 651, 4320, 8426, 25341, 36271, 1163, 573, 27894, 5929, 235265]
    ],
    "BERT is designed to pre-train deep bidirectional representations from unlabeled text by "
    "jointly conditioning on both left and right context in all layers.": [
        *[2, 25894, 603, 6869, 577, 953, 235290, 8297, 5271, 209099, 41642, 774, 748, 78253],
        *[2793, 731, 51506, 34346, 611, 2145, 2731, 578, 1833, 4807, 575, 832, 16630, 235265],
    ],
}
# Special tokens (from the template), unicode, whitespace runs and tabs, digits, an apostrophe.
SAMPLE = [
    {"role": "user", "content": "Héllo  wörld!\n\n   1234567 + 89 = ?\t日本語 🦙 don't"},
    {"role": "assistant", "content": "  It's 1234656.\n"},
    {"role": "user", "content": "Thanks…   ok 3.14"},
]


class Real:
    """One recipe model: its transformers checkpoint `src`, its fp32 MLX conversion `out`, and
    what the tests read of them, each loaded or computed once (tests must not change them)."""

    def __init__(self, src: Path, out: Path):
        self.src, self.out = src, out

    @functools.cached_property
    def hf(self):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.src, dtype=torch.float32).eval()

    def hf_logits(self, ids: list[int]) -> np.ndarray:
        """As helpers.hf_logits, on the model loaded once."""
        import torch

        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float().numpy()

    @functools.cached_property
    def hf_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.src)

    @functools.cached_property
    def lm(self):
        """generate's loaded model (model + tokenizer) of the conversion."""
        return load_model(self.out)

    @functools.cached_property
    def size(self) -> int:
        """Tokens the tokenizer can decode (the embedding may have padding rows past them)."""
        return len(self.lm.tokenizer.get_vocab())

    def probe(self, n: int = 40, seed: int = 1) -> list[int]:
        return np.random.default_rng(seed).integers(0, self.size, n).tolist()

    @functools.cached_property
    def reference(self) -> np.ndarray:
        """transformers' logits of probe()."""
        return self.hf_logits(self.probe())


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """name → Real, built once per module."""
    root = tmp_path_factory.mktemp("real")
    cache: dict[str, Real] = {}

    def get(name: str) -> Real:
        if name not in cache:
            src = make_real_checkpoint(name, root / name)
            cache[name] = Real(src, convert(src, root / f"{name}-mlx", dtype="float32").out)
        return cache[name]

    return get


def probe(folder, n: int = 40, seed: int = 1) -> list[int]:
    size = len(load_tokenizer(folder).get_vocab())
    return np.random.default_rng(seed).integers(0, size, n).tolist()


def our_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.mark.parametrize("name", MODELS)
def test_converts_to_transformers_logits(real, name):
    model = real(name)
    ref, got = model.reference, our_logits(model.lm.model, model.probe())
    assert np.abs(ref - got).max() <= FP32
    assert ref.std() > 0.5


@pytest.mark.parametrize("name", MODELS)
def test_rope_is_read_as_the_real_config_says(real, name):
    """transformers 5 saves the real rope_theta/rope_scaling as `rope_parameters`: the
    converted model is built with the real theta and every real scaling field."""
    config, args = real_config(name), real(name).lm.model.args
    assert args.rope_theta == config["rope_theta"]
    scaling, got = config.get("rope_scaling"), getattr(args, "rope_scaling", None)
    assert (got is None) == (scaling is None)
    for key, value in (scaling or {}).items():
        assert got[key] == (value if isinstance(value, str) else pytest.approx(value)), key
    if "original_max_position_embeddings" in config:  # Phi-3.5: where longrope switches
        got = getattr(args, "original_max_position_embeddings", None)
        assert got == config["original_max_position_embeddings"]


def test_phi35_past_its_original_context_takes_the_long_factors(real):
    """Phi-3.5-mini's longrope: short factors up to 4096 tokens, long ones past it."""
    phi = real("Phi-3.5-mini-instruct")
    assert real_config("Phi-3.5-mini-instruct")["original_max_position_embeddings"] == 4096
    model = phi.lm.model
    ids = phi.probe(4100)
    ref, got = phi.hf_logits(ids), our_logits(model, ids)
    assert np.abs(ref - got).max() <= 1e-3  # 4100 positions of fp32 rounding
    # …and the two regimes really differ: the first 40 positions alone took the short ones.
    assert np.abs(got[:40] - our_logits(model, ids[:40])).max() > 0.1


@pytest.mark.parametrize(
    "rope,error",
    [
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, None),
        ({"rope_type": "dynamic", "factor": 2.0}, None),
        ({"rope_type": "linear", "factor": 2.0}, None),
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "attention_factor": 1.3,
            },
            "attention_factor",
        ),
    ],
    ids=["yarn", "dynamic", "linear", "yarn-attention-factor"],
)
def test_each_rope_type_converts_right_or_is_refused(rope, error, checkpoints, tmp_path):
    """Past max_position_embeddings (32) too, where dynamic and yarn differ from plain rope."""
    rope = {"rope_theta": 5e4, **rope}
    src = checkpoints("llama", max_position_embeddings=32, rope_parameters=rope)
    if error:
        with pytest.raises(MlxLocalError, match=error):
            convert(src, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    convert(src, tmp_path / "out")
    ids = probe(src, 48)
    assert np.abs(hf_logits(src, ids) - our_logits(load(tmp_path / "out")[0], ids)).max() <= FP32


@pytest.mark.parametrize("arch,rope", [("gemma2", "linear"), ("phi3", "dynamic")])
def test_a_rope_the_architecture_drops_is_refused(arch, rope, tmp_path):
    """mlx-lm's gemma2 has no rope scaling and its phi3 falls back to plain rope."""
    config = real_config("gemma-2-2b-it" if arch == "gemma2" else "Phi-3.5-mini-instruct")
    config["rope_scaling"] = {"rope_type": rope, "factor": 2.0}
    from mlxlocal.models import check_rope_built

    with pytest.raises(MlxLocalError, match=f"ignores rope_scaling '{rope}'"):
        check_rope_built(config)


@pytest.mark.parametrize("name", MODELS)
def test_quantizes_as_mlx_lm_does(real, name, tmp_path):
    """4-bit group 32: the layers we quantize, quantized by nn.quantize, give our logits."""
    out = real(name).out
    quantize(out, tmp_path / "q", bits=4, group_size=32, evaluate=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    ours = load(tmp_path / "q")[0]
    quantized = {p: m for p, m in ours.named_modules() if hasattr(m, "scales")}
    assert any("mlp" in p for p in quantized) and any("attn" in p for p in quantized)
    reference = load(out)[0]

    def same(path, module):  # each layer as ours has it: kept, or at its bits and group
        q = quantized.get(path)
        return q is not None and {"group_size": q.group_size, "bits": q.bits}

    nn.quantize(reference, class_predicate=same)
    ids = real(name).probe()
    assert np.abs(our_logits(ours, ids) - our_logits(reference, ids)).max() <= FP32


def hf_greedy(model: Real, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens over the ids the tokenizer can decode (padding rows masked)."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(model.hf_logits(ids + out)[-1, : model.size].argmax()))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_generates_through_its_chat_template(real, name):
    model = real(name)
    lm = model.lm
    messages = [{"role": "user", "content": "Translate the sentence"}]
    ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == model.hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
    result = generate(lm, "Translate the sentence", max_tokens=6, ignore_eos=True)
    assert result.tokens == hf_greedy(model, ids, 6)


@functools.cache
def spm(family: str):
    """SentencePiece itself on the family's model (Mistral v0.3's file; Gemma's pieces)."""
    import sentencepiece

    if family == "gemma":
        return sentencepiece.SentencePieceProcessor(model_proto=gemma_model_proto())
    return sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL))


@functools.cache
def reference_cases(family: str) -> list[tuple[str, list[int]]]:
    """(text, ids) of llama.cpp's 46 tokenizer texts: the ids the real HF tokenizer gave
    (`.out`); for Mistral v0.3 and Gemma 2, whose tokenizers llama.cpp has no fixture of,
    SentencePiece's own ids from the real pieces."""
    if family not in ("mistral", "gemma"):
        return cases(family)
    sp = spm(family)
    return [(text, sp.encode(text)) for text, _ in cases("llama-spm")]


def sentencepiece_with_specials(family: str, text: str) -> list[int]:
    """SentencePiece's ids of a text holding control tokens (<s>, [INST], <bos>…): each piece
    between them encoded on its own (as the tokenizer.json of a SentencePiece model splits at
    added tokens; SentencePiece never reads a control token from text)."""
    import re

    sp = spm(family)
    specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        ids += [specials[part]] if part in specials else sp.encode(part) if part else []
    return ids


def test_gemma_pieces_give_gemmas_published_ids(real):
    """The rebuilt SentencePiece model and the checkpoint's tokenizer give the ids Gemma's
    real tokenizer gives (inner spaces, byte fallback, a lone space)."""
    sp = spm("gemma")
    assert sp.get_piece_size() == 256000
    assert [sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()] == [0, 1, 2, 3]
    assert sp.piece_to_id("<start_of_turn>") == 106 and sp.piece_to_id("<end_of_turn>") == 107
    ours = real("gemma-2-2b-it").lm.tokenizer
    for text, ids in GEMMA_IDS.items():
        assert [sp.bos_id(), *sp.encode(text)] == ids, text
        assert ours.encode(text) == ids, text


@pytest.mark.parametrize("name", REAL)
def test_tokenizes_as_the_real_tokenizer(real, name):
    """The converted checkpoint's tokenizer, as generate loads it: the real ids on the 46 texts
    (and back to the text), and a chat through the real template equal to transformers' ids."""
    model = real(name)
    ours = model.lm.tokenizer
    family = REAL_VOCAB[name]
    wrong = []
    for text, ids in reference_cases(family):
        if ours.encode(text, add_special_tokens=False) != ids or ours.decode(ids) != text:
            wrong.append(text)
    assert wrong == []
    rendered = ours.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    ids = ours.encode(rendered, add_special_tokens=False)
    reference = model.hf_tokenizer
    assert ids == reference.apply_chat_template(
        SAMPLE, add_generation_prompt=True, return_dict=False
    )
    # Back to the text as transformers decodes it; exactly the text for byte-level BPE (a
    # SentencePiece piece after a special token carries its own word marker: one more space).
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids) == rendered or family in ("mistral", "phi-3")
    if family in ("mistral", "gemma"):
        assert ids == sentencepiece_with_specials(family, rendered)
    if family == "phi-3":  # llama.cpp's own Phi-3 vocabulary on the same text
        import llama_cpp

        gguf_file = VOCAB / "ggml-vocab-phi-3.gguf"
        llm = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids


@pytest.mark.parametrize("name", REAL)
def test_the_stop_set_is_exactly_the_real_end_of_turn_ids(real, name):
    assert real(name).lm.stop_ids == STOPS[REAL_VOCAB[name]][0]


# Not Gemma 2. Its random model (tied, √hidden-scaled embeddings) repeats one token, so no
# prompt's first four greedy tokens are distinct (seed 2 of its weights has one); and mlx-lm's
# gemma2 always reads its output from the embedding (no lm_head to untie), so swapping output
# rows would change the prompt too, whose template holds <end_of_turn>. Its stop set is checked
# above, and the stop itself on the other four.
@pytest.mark.parametrize("name", [n for n in REAL if n != "gemma-2-2b-it"])
def test_generate_and_chat_stop_at_the_real_end_of_turn(real, name, tmp_path):
    """A model rigged to end its turn at the third token stops there in generate and chat and
    never shows the token."""
    out = real(name).out
    _, end = STOPS[REAL_VOCAB[name]]
    folder = tmp_path / "rigged"
    shutil.copytree(out, folder)
    prompt = rig_end_of_turn(folder, end)
    lm = load_model(folder)
    free = generate(lm, prompt, max_tokens=4, ignore_eos=True)
    assert free.tokens[3] == end
    result = generate(lm, prompt, max_tokens=12)
    assert result.tokens == free.tokens and result.finish_reason == "stop"
    shown = generate(lm, prompt, max_tokens=3, ignore_eos=True).text
    assert result.text == shown
    marker = lm.tokenizer.convert_ids_to_tokens(end)
    assert marker not in result.text
    answer = CliRunner().invoke(cli, ["chat", str(folder), "--max-tokens", "12"], input=prompt)
    assert answer.exit_code == 0, answer.output
    assert answer.stdout == shown + "\n"


@pytest.fixture(scope="module")
def llama_cpp():
    """llama_cpp with weight repacking off (see tests/test_gguf.py)."""
    import llama_cpp

    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    yield llama_cpp
    llama_cpp.llama_cpp.llama_model_default_params = default


@pytest.mark.parametrize("name", MODELS)
def test_exports_to_a_gguf_llama_cpp_runs_with_transformers_logits(real, name, llama_cpp, tmp_path):
    model = real(name)
    export_gguf(model.out, tmp_path / "m.gguf", type="f32")
    llm = llama_cpp.Llama(
        str(tmp_path / "m.gguf"),
        n_ctx=128,
        logits_all=True,
        type_k=0,  # F32 KV cache
        type_v=0,
        n_threads=2,
        verbose=False,
    )
    # llama.cpp tokenizes as the real tokenizer through our GGUF
    ours = model.lm.tokenizer
    encode = lambda t: llm.tokenize(t.encode(), add_bos=False, special=True)  # noqa: E731
    assert [t for t, ids in reference_cases(REAL_VOCAB[name]) if encode(t) != ids] == []
    rendered = ours.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    assert encode(rendered) == ours.encode(rendered, add_special_tokens=False)
    ids = model.probe()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    ref = model.reference
    tolerance = GGUF_REL_GELU if "gelu" in real_config(name).get("hidden_act", "") else GGUF_REL
    assert np.abs(ref - got).max() / np.abs(ref).max() <= tolerance
