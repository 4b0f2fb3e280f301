"""Tokenizers in GGUF metadata as llama.cpp names them, and their reading back into the
tokenizer.json + tokenizer_config.json that mlx-lm loads.

The pre-tokenizer names and SentencePiece's word marker are shared with GGUF export, so a
tokenizer written there reads back here as the same tokenizer.
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
