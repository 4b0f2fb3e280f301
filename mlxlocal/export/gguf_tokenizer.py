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
    elif tokenizer_json and _is_sentencepiece_bpe(tokenizer_json):
        tokens, types = _sentencepiece_json(writer, tokenizer_json, rows)
        add_bos = settings.get("add_bos_token", _post_processor_adds_bos(tokenizer_json))
    elif tokenizer_json and tokenizer_json.get("model", {}).get("type") == "BPE":
        tokens, types = _bpe(writer, tokenizer_json, rows, warnings)
        add_bos = settings.get("add_bos_token", _post_processor_adds_bos(tokenizer_json))
    else:
        raise MlxLocalError(
            f"{model}: no tokenizer.model (SentencePiece) or BPE tokenizer.json (byte-level, or "
            "SentencePiece-style with byte fallback); GGUF export needs one of them"
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


def _vocabulary(data: dict, byte_pieces: bool) -> tuple[list[str], list]:
    """tokenizer.json's vocabulary and added tokens by id, with their token types (an id no
    token has: an unused `[PADn]`); `byte_pieces`: `<0xNN>` pieces are bytes (SentencePiece's
    byte fallback)."""
    model = data["model"]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added, -1]) + 1
    tokens: list[str] = [f"[PAD{i}]" for i in range(size)]
    types = [T.UNUSED] * size
    for token, i in model["vocab"].items():
        byte = byte_pieces and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        tokens[i], types[i] = token, T.BYTE if byte else T.NORMAL
    for i, t in added.items():
        tokens[i], types[i] = t["content"], T.CONTROL if t.get("special") else T.USER_DEFINED
    return tokens, types


def _bpe(writer, data: dict, rows: int, warnings: list[str]) -> tuple[list[str], list[int]]:
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"), warnings)
    tokens, types = _vocabulary(data, byte_pieces=False)
    _padded(tokens, types, rows)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
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
            "tokenizer.json is BPE but neither byte-level nor SentencePiece-style (byte "
            "fallback); llama.cpp has no tokenizer for it"
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
            # A piece the tokenizer matches whole (SentencePiece's user-defined ones, which its
            # Python API reports as normal: Gemma's <start_of_turn>): typed so llama.cpp does
            # too, as its own converter types them from the added tokens.
            if types[t["id"]] == T.NORMAL and tokens[t["id"]] == t["content"]:
                types[t["id"]] = T.CONTROL if t.get("special") else T.USER_DEFINED
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


def _is_sentencepiece_bpe(data: dict) -> bool:
    """A tokenizer.json converted from a SentencePiece BPE model: byte fallback, no ByteLevel."""
    model = data.get("model") or {}
    text = json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    fallback = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    return fallback and "ByteLevel" not in text


def _sentencepiece_json(writer, data: dict, rows: int):
    """SentencePiece (`llama` model) from a tokenizer.json that has no tokenizer.model beside it.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores
    highest, so each piece's score is minus the rank of the first merge that makes it: the same
    order the BPE merges give (llama.cpp's own converter writes -1000 for every piece).
    """
    model = data["model"]
    tokens, types = _vocabulary(data, byte_pieces=True)
    unk = model.get("unk_token")
    if unk in model["vocab"]:
        types[model["vocab"][unk]] = T.UNKNOWN
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    lowest = -float(len(merges) + 1)
    rank: dict[str, float] = {}
    for n, (left, right) in enumerate(merges):
        rank.setdefault(left + right, -float(n))
    scores = [
        rank.get(t, lowest) if ty == T.NORMAL else 0.0 for t, ty in zip(tokens, types, strict=True)
    ]
    _padded(tokens, types, rows)
    scores += [lowest] * (len(tokens) - len(scores))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_add_space_prefix(_prepends_word_marker(data))
    return tokens, [int(t) for t in types]


def _prepends_word_marker(data: dict) -> bool:
    """Whether the tokenizer puts SentencePiece's word marker before the text."""
    norm = data.get("normalizer") or {}
    for step in norm.get("normalizers", [norm]):
        if step.get("type") == "Prepend" and step.get("prepend") == SPIECE_UNDERLINE:
            return True
    pre = data.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get(
                "add_prefix_space", True
            )
    return False
