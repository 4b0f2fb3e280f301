"""What every decoding loop shares: where an answer ends, and which ids it may contain.

An answer ends at any of the *stop ids*: the tokenizer's EOS ids, the `eos_token_id` of
config.json and generation_config.json, and the special tokens the chat template puts right
after an assistant's answer (`<|im_end|>`, `<|eot_id|>`, `<|end|>`...). Checkpoints often leave
the last out of their EOS lists, so it is found by rendering a conversation (training's loss
masks cover the same tokens): without it `generate`, `chat`, `batch` and `eval` run on past the
end of the turn.

A model's embedding may have more rows than the tokenizer has ids (padding to a multiple of 64
or 128, as SmolLM2 and Qwen2.5 do); an id there cannot be decoded, so sampling never picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint.inputs import read_json
from .data import has_chat_template
from .models import eos_token_ids, read_config

# Stands in for an answer when rendering, so what the template puts after it can be found.
ANSWER = "@@mlxlocal-answer@@"
NEXT = "@@mlxlocal-next@@"


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, named ones (EOS, BOS...) and added ones."""
    added = tokenizer.added_tokens_decoder
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special tokens a chat template puts right after an assistant's answer.

    Those after a conversation's last answer (`<|im_end|>`, or Phi-3's `<|end|>` and EOS); for a
    template that closes a last answer with nothing (Qwen1.5), the first special token between
    an answer and the next message. None without a chat template, or if the template refuses
    a plain user/assistant exchange.
    """
    if not has_chat_template(tokenizer):
        return []
    user = {"role": "user", "content": "Hi"}
    answer = {"role": "assistant", "content": ANSWER}
    last = _specials_after_answer(tokenizer, [user, answer])
    if last:
        return last
    between = _specials_after_answer(tokenizer, [user, answer, {**user, "content": NEXT}])
    return between[:1]


def _specials_after_answer(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Special token ids between the answer and the next message (or the end) as rendered."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template may raise anything (jinja's raise_exception, TypeError...)
        return []
    if ANSWER not in text:
        return []
    tail = text.split(ANSWER, 1)[1].split(NEXT, 1)[0]
    special = special_ids(tokenizer)
    return [i for i in tokenizer.encode(tail, add_special_tokens=False) if i in special]


def declared_eos_ids(path: str | Path) -> set[int]:
    """The `eos_token_id`s (an id or a list) a checkpoint's config.json and
    generation_config.json declare."""
    path = Path(path)
    ids = eos_token_ids(read_config(path), path / "config.json")
    file = path / "generation_config.json"
    if file.exists():
        config = read_json(file, "generation config", "fix the file or delete it")
        ids |= eos_token_ids(config, file)
    return ids


def stop_ids(tokenizer, path: str | Path | None = None) -> frozenset[int]:
    """Every id that ends an answer: the EOS ids (the tokenizer's, and those the checkpoint at
    `path` declares) and the chat template's end of turn."""
    ids = {tokenizer.eos_token_id} - {None}
    listed = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm's wrapper: a set; transformers: int
    ids |= {listed} if isinstance(listed, int) else set(listed or ())
    if path is not None:
        ids |= declared_eos_ids(path)
    return frozenset(ids | set(end_of_turn_ids(tokenizer)))


def stop_tokens(tokenizer, path: str | Path | None = None) -> list[str]:
    """The stop ids as token strings (for a Modelfile's `stop` parameters), sorted."""
    return sorted({tokenizer.convert_ids_to_tokens(i) for i in stop_ids(tokenizer, path)})


def decodable_only(
    tokenizer, width: int | None = None
) -> Callable[[mx.array, mx.array], mx.array] | None:
    """A logits processor (mlx-lm's signature) that gives every id the tokenizer cannot decode
    a logit of -inf, so no sampler ever picks one; None when logits `width` wide hold no such
    id (any processor makes mlx-lm's batch generator process each sequence on its own)."""
    known = np.fromiter(tokenizer.get_vocab().values(), dtype=np.int64)
    if width is not None and np.isin(np.arange(width), known).all():
        return None
    masks: dict[int, mx.array | None] = {}

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        width = logits.shape[-1]
        if width not in masks:
            allowed = np.zeros(width, dtype=bool)
            allowed[known[known < width]] = True
            masks[width] = None if allowed.all() else mx.array(allowed)
        mask = masks[width]
        return logits if mask is None else mx.where(mask, logits, float("-inf"))

    return processor
