"""The models the built-in recipes name, as their real config.json, tokenizer_config.json and
generation_config.json (tests/data/models/<name>/, SOURCE.md there), built small with random
weights.

What changes from the real config, and only this (SHRINK): 2 layers; the widths below
(head_dim, rope, norms, softcaps, windows, activations, tying: all as shipped);
initializer_range 0.15 so random logits are far from uniform.

The tokenizer is the model's real vocabulary at its real size (tests/data/llama_vocab,
SOURCE.md there; REAL_VOCAB below): vocab_size and every token id stay the shipped ones, padding
rows included (Qwen2.5: 151,665 tokens in a 151,936-row embedding). Gemma 2's 256,000 pieces
(scores, types) are Google's, its SentencePiece model rebuilt around them (gemma_model_proto).
"""

from __future__ import annotations

import base64
import functools
import json
import lzma
import tempfile
from pathlib import Path

DATA = Path(__file__).parent / "data" / "models"
VOCAB = Path(__file__).parent / "data" / "llama_vocab"
# name → the sizes that shrink; head_dim (explicit or hidden/heads) stays the real one.
SHRINK = {
    "Llama-3.2-1B-Instruct": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1),
    "Llama-3.2-3B-Instruct": dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1),
    "Qwen2.5-0.5B-Instruct": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
    "Qwen2.5-1.5B-Instruct": dict(hidden_size=128, num_attention_heads=1, num_key_value_heads=1),
    "Qwen2.5-7B-Instruct": dict(hidden_size=128, num_attention_heads=1, num_key_value_heads=1),
    "Phi-3.5-mini-instruct": dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=2),
    # 256,000 embedding rows: the narrowest width quantization keeps (group 32 divides it).
    "gemma-2-2b-it": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1),
    "Mistral-7B-Instruct-v0.3": dict(hidden_size=128, num_attention_heads=1, num_key_value_heads=1),
}
ALWAYS = dict(num_hidden_layers=2, intermediate_size=256, initializer_range=0.15)
MODELS = sorted(SHRINK)
TEMPLATES = sorted(p.name for p in DATA.iterdir() if (p / "tokenizer_config.json").exists())
# name → the vendored vocabulary it is built from (llama.cpp's fixture family naming its texts).
REAL_VOCAB = {
    "Llama-3.2-1B-Instruct": "llama-bpe",
    "Llama-3.2-3B-Instruct": "llama-bpe",
    "Qwen2.5-0.5B-Instruct": "qwen2",
    "Qwen2.5-1.5B-Instruct": "qwen2",
    "Qwen2.5-7B-Instruct": "qwen2",
    "Phi-3.5-mini-instruct": "phi-3",
    "Mistral-7B-Instruct-v0.3": "mistral",
    "gemma-2-2b-it": "gemma",
}
GEMMA = VOCAB / "gemma2.spm.xz"
_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Settings of the real tokenizer class that a fast tokenizer built from tokenizer.json ignores.
_CLASS_ONLY = ("added_tokens_decoder", "tokenizer_class", "sp_model_kwargs", "legacy", "vocab_size")
# Llama 3's pre-tokenizer is in transformers' TikTokenConverter; Qwen2's (single digits) is not.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens after its 151,643 ranks (tokenizer_config.json's added_tokens_decoder,
# 151643…151664); the last eight are not special (they stay in decoded text).
QWEN25_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>"]
QWEN25_SPECIAL += ["<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>"]
QWEN25_SPECIAL += ["<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
QWEN25_SPECIAL += ["<|image_pad|>", "<|video_pad|>"]
QWEN25_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>"]
QWEN25_ADDED += ["<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


def real_config(name: str) -> dict:
    return json.loads((DATA / name / "config.json").read_text())


def tokenizer_config(name: str) -> dict:
    return json.loads((DATA / name / "tokenizer_config.json").read_text())


def generation_config(name: str) -> dict:
    return json.loads((DATA / name / "generation_config.json").read_text())


def special_tokens(name: str) -> list[str]:
    """The real special tokens, in the real id order (the stand-in gives them ids 0, 1, …)."""
    decoder = tokenizer_config(name)["added_tokens_decoder"]
    return [decoder[k]["content"] for k in sorted(decoder, key=int)]


def _settings(name: str) -> dict:
    """tokenizer_config.json's settings as a fast tokenizer built from tokenizer.json reads them."""
    real = tokenizer_config(name)
    settings = {k: v for k, v in real.items() if k not in _CLASS_ONLY}
    settings |= {k: real.get(k) for k in _TOKEN_KEYS}
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    return settings


def write_stand_in_tokenizer(name: str, out: Path) -> int:
    """The stand-in tokenizer with `name`'s special tokens, template and settings; its size."""
    from mlxlocal.tiny import write_tokenizer

    return write_tokenizer(out, special_tokens=special_tokens(name), **_settings(name))


def llama3_special_tokens() -> list[str]:
    """Llama 3.1/3.2's 256 special tokens as their Hugging Face tokenizer names them."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>"}
    named |= {6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>"}
    named |= {9: "<|eot_id|>", 10: "<|python_tag|>"}
    reserved = iter(range(256))
    return [named.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(256)]


def tiktoken_tokenizer(ranks: Path, special: list[str], pattern: str | None = None):
    """The `tokenizers` Tokenizer transformers' own TikTokenConverter makes from tiktoken
    ranks (how Llama 3's tokenizer.json was made), `special` numbered after the ranks."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):  # tiktoken's file format, without the tiktoken package
            pairs = (line.split() for line in Path(path).read_text().splitlines() if line)
            return {base64.b64decode(t): int(r) for t, r in pairs}

    args = (pattern,) if pattern else ()
    return Converter(str(ranks), *args, extra_special_tokens=special).converted()


def write_llama3_tokenizer(out: Path, special: list[str]) -> None:
    """Llama 3's tokenizer.json from its tokenizer.model ranks (BOS added, as shipped)."""
    from tokenizers import processors

    tokenizer = tiktoken_tokenizer(VOCAB / "llama3-tokenizer.model", special)
    bos = special[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 128000)]
    )
    tokenizer.save(str(out / "tokenizer.json"))


def write_qwen2_tokenizer(out: Path, special: list[str], added: list[str] = ()) -> None:
    """Qwen2's tokenizer.json from Qwen's rank file (NFC, merges not ignored, no BOS)."""
    from tokenizers import AddedToken, normalizers

    tokenizer = tiktoken_tokenizer(VOCAB / "qwen.tiktoken", special, QWEN2_PATTERN)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tokenizer.model.ignore_merges = False  # as Qwen2's tokenizer.json
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.post_processor = None
    tokenizer.save(str(out / "tokenizer.json"))


def sentencepiece_fields(model: Path) -> dict:
    """A SentencePiece model's pieces as the GGUF metadata llama.cpp's converter writes of it
    (pieces, scores, token types), for our GGUF tokenizer import to rebuild tokenizer.json."""
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    T = gguf.TokenType
    types = []
    for i in range(sp.vocab_size()):
        if sp.is_unknown(i):
            types.append(T.UNKNOWN)
        elif sp.is_control(i):
            types.append(T.CONTROL)
        elif sp.is_byte(i):
            types.append(T.BYTE)
        elif sp.is_unused(i):
            types.append(T.UNUSED)
        else:
            types.append(T.NORMAL)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.vocab_size())],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(sp.vocab_size())],
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
    }


@functools.cache
def gemma_model_proto() -> bytes:
    """Gemma 2's SentencePiece model: its 256,000 pieces, scores and types (GEMMA, one
    `base64(piece) score type` line each, in id order) with the settings Gemma's tokenizer
    encodes by: BPE with byte fallback, no normalization but spaces written as "▁", no dummy
    prefix; <pad> <eos> <bos> <unk> = 0 1 2 3. (Google's own file is not vendored; its
    training-only fields are not needed to encode.)"""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    for line in lzma.decompress(GEMMA.read_bytes()).decode().splitlines():
        piece, score, kind = line.split(" ")
        model.pieces.add(piece=base64.b64decode(piece).decode(), score=float(score), type=int(kind))
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size = pb.TrainerSpec.BPE, len(model.pieces)
    spec.byte_fallback = spec.split_digits = spec.allow_whitespace_only_pieces = True
    for i, name in enumerate(("pad", "eos", "bos", "unk")):
        setattr(spec, f"{name}_id", i)
        setattr(spec, f"{name}_piece", f"<{name}>")
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces = "identity", False, False
    norm.escape_whitespaces = True
    return model.SerializeToString()


@functools.cache
def _real_tokenizer_files(family: str) -> dict[str, bytes]:
    """tokenizer.json (+ what our GGUF import writes beside it) of a vendored vocabulary,
    built once per process (Llama 3's merges take transformers ~15 s to derive)."""
    from mlxlocal.checkpoint.gguf import open_gguf
    from mlxlocal.checkpoint.gguf_tokenizer import write_tokenizer_files

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if family == "llama-bpe":
            write_llama3_tokenizer(out, llama3_special_tokens())
        elif family == "qwen2":
            write_qwen2_tokenizer(out, QWEN25_SPECIAL, QWEN25_ADDED)
        elif family == "phi-3":  # llama.cpp's Phi-3 vocabulary GGUF, through our GGUF import
            write_tokenizer_files(open_gguf(VOCAB / "ggml-vocab-phi-3.gguf")[1], out)
        elif family == "gemma":  # as the Hub ships it: tokenizer.model + transformers' conversion
            return write_gemma_tokenizer(out)
        else:  # Mistral v0.3's SentencePiece model, as llama.cpp converts it, through our import
            fields = sentencepiece_fields(VOCAB / "mistral-v0.3-tokenizer.model")
            write_tokenizer_files(fields, out)
        return {"tokenizer.json": (out / "tokenizer.json").read_bytes()}


def write_gemma_tokenizer(out: Path) -> dict[str, bytes]:
    """tokenizer.model (gemma_model_proto) and the tokenizer.json transformers makes of it
    (BOS added, as shipped)."""
    from tokenizers import processors
    from transformers import GemmaTokenizer

    (out / "tokenizer.model").write_bytes(gemma_model_proto())
    tokenizer = GemmaTokenizer.from_pretrained(str(out)).backend_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    return {name: (out / name).read_bytes() for name in ("tokenizer.model", "tokenizer.json")}


def write_real_tokenizer(name: str, out: Path) -> None:
    """`name`'s real vocabulary (REAL_VOCAB) as tokenizer.json, with its real
    tokenizer_config.json settings and chat template."""
    from tokenizers import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for file, data in _real_tokenizer_files(REAL_VOCAB[name]).items():
        (out / file).write_bytes(data)
    settings = _settings(name)
    if not settings.get("add_bos_token", True):  # Phi-3.5 adds no BOS (its template has none)
        tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
        tokenizer.post_processor = None
        tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)
    for i, token in tokenizer_config(name)["added_tokens_decoder"].items():
        assert vocab[token["content"]] == int(i), (name, token)  # the real ids


def small_config(name: str) -> dict:
    return real_config(name) | SHRINK[name] | ALWAYS


def make_real_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """A transformers checkpoint of `name` (small_config, random weights) with its real
    tokenizer and generation_config.json."""
    import torch
    import transformers

    out = Path(out)
    write_real_tokenizer(name, out)
    config, generation = small_config(name), generation_config(name)
    config.pop("auto_map", None)  # phi3 is built into transformers: no remote code
    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name or "bias" in param_name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out
