"""Tokenizers into GGUF metadata: SentencePiece (`llama` model: pieces, scores, types) and
byte-level BPE (`gpt2` model: tokens, merges, types, pre-tokenizer name).

Token types are written as INT32, the type llama.cpp reads (mlx-lm writes UINT32, which current
llama.cpp rejects). The vocabulary is padded with unused tokens up to the embedding's rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ..checkpoint.gguf_tokenizer import PRE_TOKENIZERS, SPIECE_UNDERLINE
from ..checkpoint.inputs import read_json
from ..errors import MlxLocalError
from ..models import hf_tokenizer

T = gguf.TokenType


def add_tokenizer(writer: gguf.GGUFWriter, model: Path, rows: int, config: dict) -> list[str]:
    """Write the tokenizer of checkpoint `model` into `writer`; return warnings."""
    settings = (
        read_json(model / "tokenizer_config.json", "tokenizer config")
        if (model / "tokenizer_config.json").exists()
        else {}
    )
    tokenizer_json = _effective_tokenizer(model)
    warnings: list[str] = []
    if (model / "tokenizer.model").exists():
        tokens, types = _sentencepiece(writer, model / "tokenizer.model", tokenizer_json, rows)
        add_bos = settings.get("add_bos_token", True)
    elif tokenizer_json and tokenizer_json.get("model", {}).get("type") == "BPE":
        tokens, types = _bpe(writer, tokenizer_json, rows, warnings)
        add_bos = settings.get("add_bos_token", _post_processor_adds_bos(tokenizer_json))
    else:
        raise MlxLocalError(
            f"{model}: no tokenizer.model (SentencePiece) or byte-level BPE tokenizer.json; "
            "GGUF export needs one of them"
        )
    if len(tokens) > rows:
        raise MlxLocalError(
            f"the tokenizer has {len(tokens)} tokens but the embedding only {rows} rows"
        )
    writer.add_key_value(
        gguf.Keys.Tokenizer.TOKEN_TYPE, types, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32
    )
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        fallback = config.get(f"{key}_id")
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        if token in ids:
            add(ids[token])
        elif isinstance(fallback, int) and 0 <= fallback < rows:
            add(fallback)
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(bool(settings.get("add_eos_token", False)))
    template = chat_template(model, settings)
    if template:
        writer.add_chat_template(template)
    return warnings


def _effective_tokenizer(model: Path) -> dict | None:
    """The tokenizer transformers (and so mlx-lm) really runs, as tokenizer.json data.

    Not the file on disk: transformers 5 rebuilds some from the model type (Qwen2's splits
    digits one by one whatever tokenizer.json says), and GGUF must tokenize like ours.
    """
    tokenizer = hf_tokenizer(model)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend else None


def chat_template(model: Path, settings: dict) -> str | None:
    if (model / "chat_template.jinja").exists():
        return (model / "chat_template.jinja").read_text()
    if (model / "chat_template.json").exists():
        return read_json(model / "chat_template.json", "chat template").get("chat_template")
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _padded(tokens: list, types: list, rows: int) -> None:
    for i in range(len(tokens), rows):
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)


def _bpe(writer, data: dict, rows: int, warnings: list[str]) -> tuple[list[str], list[int]]:
    model = data["model"]
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"), warnings)
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added, -1]) + 1
    tokens: list[str] = [f"[PAD{i}]" for i in range(size)]
    types = [T.UNUSED] * size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, T.NORMAL
    for i, t in added.items():
        tokens[i], types[i] = t["content"], T.CONTROL if t.get("special") else T.USER_DEFINED
    _padded(tokens, types, rows)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if merges:
        writer.add_token_merges(merges)
    return tokens, [int(t) for t in types]


def _pre_tokenizer_name(pre: dict | None, warnings: list[str]) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (it cannot run arbitrary regexes)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    splits = [s for s in steps if s.get("type") == "Split"]
    if not byte_level:
        raise MlxLocalError(
            "tokenizer.json is BPE but not byte-level (SentencePiece style?); GGUF export needs "
            "its tokenizer.model next to it"
        )
    if len(steps) == 1 and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1:
        pattern = splits[0].get("pattern", {}).get("Regex")
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    warnings.append(
        "the tokenizer's pre-tokenizer is not one llama.cpp knows by name; llama.cpp will use "
        "its default, so some texts may tokenize differently"
    )
    return "default"


def _post_processor_adds_bos(data: dict) -> bool:
    post = data.get("post_processor") or {}
    steps = post.get("processors", [post])
    for step in steps:
        single = step.get("single") or []
        if step.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
            return True
    return False


def _sentencepiece(writer, path: Path, data: dict | None, rows: int):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(T.UNKNOWN)
        elif sp.is_control(i):
            types.append(T.CONTROL)
        elif sp.is_unused(i):
            types.append(T.UNUSED)
        elif sp.is_byte(i):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    for t in sorted((data or {}).get("added_tokens", []), key=lambda t: t["id"]):
        if t["id"] < len(tokens):
            continue
        if t["id"] != len(tokens):
            raise MlxLocalError(f"{path.parent}: added token ids are not contiguous")
        tokens.append(t["content"])
        scores.append(-1000.0)
        types.append(T.CONTROL if t.get("special") else T.USER_DEFINED)
    pad_from = len(tokens)
    _padded(tokens, types, rows)
    scores += [-1000.0] * (len(tokens) - pad_from)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith(SPIECE_UNDERLINE))
    return tokens, [int(t) for t in types]
