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
from .gguf import get_field

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

    kind = get_field(fields, gguf.Keys.Tokenizer.MODEL, "text", None)
    tokens = get_field(fields, gguf.Keys.Tokenizer.LIST, "list of text", None)
    if not tokens or kind not in ("gpt2", "llama"):
        raise MlxLocalError(
            f"the GGUF tokenizer model {str(kind)[:40]!r} is not supported (byte-level BPE "
            "'gpt2' and SentencePiece 'llama' are)"
        )
    types = _per_token(fields, gguf.Keys.Tokenizer.TOKEN_TYPE, "integer", T.NORMAL, tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        tokenizer = _bpe_from_gguf(fields, vocab)
    else:
        tokenizer = _sentencepiece_from_gguf(fields, tokens, types, vocab)
    rstrip = _rstrip_tokens(fields, tokens, types)
    tokenizer.add_tokens(
        [
            AddedToken(t, special=ty == T.CONTROL, normalized=False, rstrip=t in rstrip)
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
        i = get_field(fields, key, "integer", None)
        if i is not None and 0 <= i < len(tokens):
            special[name] = tokens[i]
    add_bos = get_field(fields, gguf.Keys.Tokenizer.ADD_BOS, "flag", kind == "llama")
    if add_bos and "bos_token" in special:
        bos = special["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = get_field(fields, gguf.Keys.Tokenizer.ADD_EOS, "flag", False)
    template = get_field(fields, gguf.Keys.Tokenizer.CHAT_TEMPLATE, "text", None)
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _rstrip_tokens(fields: dict, tokens: list, types: list) -> set[str]:
    """Special tokens that swallow the spaces after them. GGUF does not record it; llama.cpp
    sets it by model name, for Phi-3 (whose tokenizer.json marks them rstrip), and so do we."""
    name = str(get_field(fields, "general.name", "text", "")).lower()
    arch = get_field(fields, "general.architecture", "text", "")
    if arch != "phi3" and "phi-3" not in name and "phi3" not in name:
        return set()
    found = {t for t, ty in zip(tokens, types, strict=True) if ty in (T.CONTROL, T.USER_DEFINED)}
    return (found | {"</s>"}) - {"<unk>", "<s>", "<|endoftext|>"}


def _bpe_from_gguf(fields: dict, vocab: dict[str, int]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = get_field(fields, gguf.Keys.Tokenizer.PRE, "text", "gpt-2")
    merges = [
        _merge(m, vocab) for m in get_field(fields, gguf.Keys.Tokenizer.MERGES, "list of text", [])
    ]
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
            f"the GGUF's BPE pre-tokenizer {pre[:40]!r} is not supported for import "
            f"(supported: gpt-2, {', '.join(patterns)})"
        )
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_from_gguf(fields: dict, tokens: list, types: list, vocab: dict[str, int]):
    """SentencePiece's pieces and scores as a byte-fallback BPE, the way transformers does."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _per_token(fields, gguf.Keys.Tokenizer.SCORES, "number", 0.0, tokens)
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
    # As SentencePiece (and Llama 2's tokenizer.json) do: the word marker is prepended even to a
    # text that starts with a space (" " → "▁▁"); a Metaspace pre-tokenizer would not.
    prefix = get_field(fields, gguf.Keys.Tokenizer.ADD_PREFIX, "flag", True)
    steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if prefix else []
    steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _per_token(fields: dict, key: str, kind: str, default, tokens: list[str]) -> list:
    """A list with one value per token (`default` each when the GGUF has none)."""
    values = get_field(fields, key, f"list of {kind}", None)
    if values is None:
        return [default] * len(tokens)
    if len(values) != len(tokens):
        raise MlxLocalError(
            f"the GGUF's {key} has {len(values)} entries for {len(tokens)} tokens; the file is "
            "corrupt — re-download it"
        )
    return values


def _merge(merge: str, vocab: dict[str, int]) -> tuple[str, str]:
    """A BPE merge 'left right' as a pair of tokens the vocabulary holds."""
    pair = tuple(merge.split(" ", 1))
    if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab:
        raise MlxLocalError(
            f"the GGUF's BPE merge {merge[:40]!r} is not two tokens of its vocabulary separated "
            "by a space; the file is corrupt — re-download it"
        )
    return pair
