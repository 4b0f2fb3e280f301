"""Tokenizers in GGUF metadata, both ways: SentencePiece (`llama` model: pieces, scores, types)
and byte-level BPE (`gpt2` model: tokens, merges, types, pre-tokenizer name).

Token types are written as INT32, the type llama.cpp reads (mlx-lm writes UINT32, which current
llama.cpp rejects). The vocabulary is padded with unused tokens up to the embedding's rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ..errors import MlxLocalError

T = gguf.TokenType
# The pre-tokenizer regexes of tokenizer.json files llama.cpp knows by name.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}
SPIECE_UNDERLINE = "\u2581"


def add_tokenizer(writer: gguf.GGUFWriter, model: Path, rows: int, config: dict) -> list[str]:
    """Write the tokenizer of checkpoint `model` into `writer`; return warnings."""
    settings = (
        _read(model / "tokenizer_config.json") if (model / "tokenizer_config.json").exists() else {}
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
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError) as e:
        raise MlxLocalError(f"{model}: cannot load the tokenizer ({e})") from e
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend else None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxLocalError(f"{path}: not valid JSON ({e})") from e


def chat_template(model: Path, settings: dict) -> str | None:
    if (model / "chat_template.jinja").exists():
        return (model / "chat_template.jinja").read_text()
    if (model / "chat_template.json").exists():
        return _read(model / "chat_template.json").get("chat_template")
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


def write_tokenizer_files(fields: dict, out: Path) -> None:
    """Rebuild tokenizer.json + tokenizer_config.json (what mlx-lm loads) from GGUF metadata."""
    from tokenizers import AddedToken, processors

    kind = fields.get(gguf.Keys.Tokenizer.MODEL)
    tokens = fields.get(gguf.Keys.Tokenizer.LIST)
    types = fields.get(gguf.Keys.Tokenizer.TOKEN_TYPE) or [T.NORMAL] * len(tokens or [])
    if not tokens or kind not in ("gpt2", "llama"):
        raise MlxLocalError(
            f"the GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' and "
            "SentencePiece 'llama' are)"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        tokenizer = _bpe_from_gguf(fields, vocab)
    else:
        tokenizer = _sentencepiece_from_gguf(fields, tokens, types, vocab)
    tokenizer.add_tokens(
        [
            AddedToken(t, special=ty == T.CONTROL, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty in (T.CONTROL, T.USER_DEFINED)
        ]
    )
    special = {}
    for key, name in (
        (gguf.Keys.Tokenizer.BOS_ID, "bos_token"),
        (gguf.Keys.Tokenizer.EOS_ID, "eos_token"),
        (gguf.Keys.Tokenizer.UNK_ID, "unk_token"),
        (gguf.Keys.Tokenizer.PAD_ID, "pad_token"),
    ):
        i = fields.get(key)
        if isinstance(i, int) and 0 <= i < len(tokens):
            special[name] = tokens[i]
    add_bos = bool(fields.get(gguf.Keys.Tokenizer.ADD_BOS, kind == "llama"))
    if add_bos and "bos_token" in special:
        bos = special["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = bool(fields.get(gguf.Keys.Tokenizer.ADD_EOS, False))
    if fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE):
        config["chat_template"] = fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _bpe_from_gguf(fields: dict, vocab: dict[str, int]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = fields.get(gguf.Keys.Tokenizer.PRE, "gpt-2")
    merges = [tuple(m.split(" ", 1)) for m in fields.get(gguf.Keys.Tokenizer.MERGES) or []]
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre == "llama-bpe"))
    patterns = {name: pattern for pattern, name in PRE_TOKENIZERS.items()}
    if pre in patterns:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "gpt-2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise MlxLocalError(
            f"the GGUF's BPE pre-tokenizer {pre!r} is not supported for import "
            f"(supported: gpt-2, {', '.join(patterns)})"
        )
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_from_gguf(fields: dict, tokens: list, types: list, vocab: dict[str, int]):
    """SentencePiece's pieces and scores as a byte-fallback BPE, the way transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = fields.get(gguf.Keys.Tokenizer.SCORES) or [0.0] * len(tokens)
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (T.NORMAL, T.USER_DEFINED)}
    merges = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[i], i, mergeable[left], mergeable[right], left, right))
    merges.sort()
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == T.UNKNOWN), None)
    tokenizer = Tokenizer(
        models.BPE(vocab, [m[4:] for m in merges], unk_token=unk, byte_fallback=True, fuse_unk=True)
    )
    prefix = bool(fields.get(gguf.Keys.Tokenizer.ADD_PREFIX, True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_UNDERLINE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer
