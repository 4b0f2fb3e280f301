"""Constrained decoding: answers in the shape asked for (one of some labels, a regex, a JSON schema,
any JSON object), enforced as a logits mask at every decoding step.

The engine is llguidance (Microsoft's structured-generation library, Rust with Python bindings).
Measured against outlines-core and xgrammar on byte-level BPE tokenizers of 32k and 128k tokens
and a 32k SentencePiece one (mask time per step, median; compile time per constraint):

- llguidance: compiles a JSON schema in 2-40 ms, masks in 0.07-0.26 ms per step (a broad regex
  such as `[A-Za-z ]{1,30}` on 128k tokens: ~5 ms); reads the tokenizer itself from the HF
  tokenizer.json (byte-level BPE and SentencePiece alike); needs no torch.
- outlines-core: masks fastest (~0.01 ms) but builds a full index first: 14 s (32k) and 24 s
  (128k) for one JSON schema, 0.3-1 s for three labels, and wants our own token-bytes table.
- xgrammar: fast masks and compiles, but requires torch and triton at run time.

So llguidance: no per-constraint wait (labels can differ per batch record), no torch, clear error
messages for bad regexes and unsupported schema features, and masks far below a decode step.

JSON is written compactly (`{"a": 1, "b": [2, 3]}`: no free whitespace), so a weak model cannot
spend its tokens on blank lines. An answer ends when the constraint is complete (nothing but the
end of the turn could follow) or with a stop id once it is accepted; `valid` says whether the
text satisfies the constraint (false when max_tokens cut it short).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .checkpoint.inputs import read_json
from .errors import MlxLocalError

KINDS = ("choices", "regex", "json_schema", "json")
# Compact JSON: one line, a space after ':' and ','; no free whitespace a model could loop on.
JSON_OPTIONS = {"whitespace_flexible": False}
# Rust regex-syntax's meta characters (what `regex::escape` escapes).
_META = set("\\.+*?()|[]{}^$#&-~")


@dataclass(frozen=True)
class Constraint:
    """What an answer must look like (made by `from_options`)."""

    kind: str
    spec: Any  # the labels, the pattern, the schema (a dict), or None for any JSON object
    grammar: str  # llguidance's grammar for it
    # The same after an optional space: mlx-lm's detokenizers drop the space a first token
    # often starts with (SentencePiece's "▁yes", byte-level BPE's "Ġyes"), so the shown text
    # still satisfies the constraint, and the model keeps its most natural first tokens.
    spaced: str

    def describe(self) -> str:
        if self.kind == "choices":
            return "one of: " + ", ".join(self.spec)
        if self.kind == "regex":
            return f"regex {self.spec}"
        return "a JSON object" + (" matching the schema" if self.kind == "json_schema" else "")

    def to_json(self) -> dict[str, Any]:
        """What a settings file records (batch compares it on resume)."""
        return {"kind": self.kind, "spec": self.spec}

    def start(self, tokenizer, width: int, stop_ids: Iterable[int]) -> ConstrainedAnswer:
        """A fresh matcher for one answer, for logits `width` wide; `stop_ids` end the answer
        once the constraint accepts it."""
        vocabulary = _vocabulary(tokenizer, width, frozenset(stop_ids))
        return ConstrainedAnswer(vocabulary.matcher(self), width)


def choice_constraint(labels: Sequence[str]) -> Constraint:
    """Exactly one of `labels`."""
    labels = list(dict.fromkeys(labels))
    if not labels:
        raise MlxLocalError("--choices needs at least one label, e.g. --choices yes,no")
    for label in labels:
        if not isinstance(label, str) or not label:
            raise MlxLocalError(
                f"choice {label!r} is empty or not text: every label must be a non-empty string"
            )
    pattern = "|".join("".join("\\" + c if c in _META else c for c in s) for s in labels)
    return Constraint("choices", labels, *_regex_grammars(pattern, "choices"))


def regex_constraint(pattern: str) -> Constraint:
    """The whole answer matches `pattern` (Rust regex syntax: no look-around, no backrefs)."""
    if not isinstance(pattern, str) or not pattern:
        raise MlxLocalError("--regex needs a pattern, e.g. --regex '[0-9]{3}'")
    return Constraint("regex", pattern, *_regex_grammars(pattern, f"regex {pattern!r}"))


def schema_constraint(schema: dict[str, Any] | str | Path) -> Constraint:
    """A JSON value valid under `schema` (a dict, or the path of a JSON file holding it)."""
    if isinstance(schema, str | Path):
        schema = read_json(Path(schema), "JSON schema", "give a JSON schema file")
    if not isinstance(schema, dict):
        raise MlxLocalError('a JSON schema must be a JSON object, e.g. {"type": "object"}')
    return Constraint("json_schema", schema, *_schema_grammars(schema, "JSON schema"))


def json_constraint() -> Constraint:
    """Any JSON object."""
    return Constraint("json", None, *_schema_grammars({"type": "object"}, "JSON"))


def from_options(
    choices: Sequence[str] | str | None = None,
    regex: str | None = None,
    json_schema: dict | str | Path | None = None,
    json_object: bool = False,
) -> Constraint | None:
    """The one constraint the options ask for (the CLI's flags, the Python API's parameters), or
    None. `choices` may be a comma-separated string."""
    given = [
        n
        for n, v in [("choices", choices), ("regex", regex), ("json_schema", json_schema)]
        if v is not None
    ] + (["json_object"] if json_object else [])
    if len(given) > 1:
        raise MlxLocalError(f"give one constraint, not {' and '.join(given)}")
    if choices is not None:
        return choice_constraint(split_choices(choices) if isinstance(choices, str) else choices)
    if regex is not None:
        return regex_constraint(regex)
    if json_schema is not None:
        return schema_constraint(json_schema)
    return json_constraint() if json_object else None


def split_choices(text: str) -> list[str]:
    """`a,b,c` → the labels (surrounding spaces dropped)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def constraint_from_response_format(response_format: dict[str, Any] | None) -> Constraint | None:
    """The constraint an OpenAI `response_format` asks for: `{"type": "text"}` (none),
    `{"type": "json_object"}`, or `{"type": "json_schema", "json_schema": {"schema": {...}}}`.
    Anything else is an MlxLocalError (a 400 for a server)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_constraint()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise MlxLocalError(
                'response_format json_schema needs {"json_schema": {"schema": {...}}}'
            )
        return schema_constraint(schema)
    raise MlxLocalError(
        f"response_format type {kind!r} is not supported: use text, json_object or json_schema"
    )


def _regex_grammars(pattern: str, what: str) -> tuple[str, str]:
    """(the grammar of `pattern`, the same after an optional space)."""
    from llguidance import LLMatcher

    plain = _grammar(LLMatcher.grammar_from_regex(pattern), what)
    return plain, _grammar(LLMatcher.grammar_from_regex(f" ?(?:{pattern})"), what)


def _schema_grammars(schema: dict, what: str) -> tuple[str, str]:
    """(the grammar of JSON valid under `schema`, the same after an optional space)."""
    from llguidance import LLMatcher

    try:
        plain = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except Exception as e:  # llguidance raises ValueError/RuntimeError for what it cannot read
        raise MlxLocalError(f"{what}: {_one_line(str(e))}; fix the schema") from e
    plain = _grammar(plain, what)
    options = {**JSON_OPTIONS, **schema.get("x-guidance", {})}
    body = json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)
    return plain, _grammar(f'start: " "? body\nbody: %json {body}', what)


def _grammar(grammar: str, what: str) -> str:
    """The grammar if llguidance accepts it, else an MlxLocalError saying why in one line."""
    from llguidance import LLMatcher

    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise MlxLocalError(f"{what}: {_one_line(messages[0])}")
    return grammar


def _one_line(message: str) -> str:
    """llguidance's multi-line error (with a caret drawing) as its first line plus the reason."""
    lines = [s.strip() for s in message.splitlines() if s.strip()]
    reason = next((s[len("error:") :].strip() for s in lines if s.startswith("error:")), None)
    first = lines[0] if lines else message
    first = first.split("(in regex)")[0].rstrip(": ") if "(in regex)" in first else first
    if first.startswith("at ") and ": " in first:  # "at 1(8): invalid regex ..."
        first = first.split(": ", 1)[1]
    return f"{first}: {reason}" if reason else first


class _Vocabulary:
    """llguidance's view of one tokenizer at one logits width (built once: ~1-10 s)."""

    def __init__(self, tokenizer, width: int, stop_ids: frozenset[int]):
        import llguidance.hf

        hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF one
        eos = sorted(i for i in stop_ids if i < width) or None
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=width, eos_token=eos)
        except ValueError as e:
            raise MlxLocalError(
                f"constrained decoding needs a fast (tokenizer.json) tokenizer: {e}"
            ) from e
        self._matchers: dict[str, Any] = {}
        self.trims_space = self._trims_space(tokenizer)

    def _trims_space(self, tokenizer) -> bool:
        """Whether the text shown of an answer drops the space its first token begins with."""
        detokenizer = getattr(tokenizer, "detokenizer", None)  # mlx-lm's: a fresh copy each time
        if detokenizer is None:
            return False
        for token in self.tokenizer.tokenize_str(" a"):
            detokenizer.add_token(token)
        detokenizer.finalize()
        return detokenizer.text == "a"

    def matcher(self, constraint: Constraint):
        """A fresh llguidance matcher for `constraint` (compiled once, then copied)."""
        from llguidance import LLMatcher

        grammar = constraint.spaced if self.trims_space else constraint.grammar
        base = self._matchers.get(grammar)
        if base is None:
            base = LLMatcher(self.tokenizer, grammar, log_level=0)
            if base.is_error():
                raise MlxLocalError(f"{constraint.describe()}: {_one_line(base.get_error())}")
            if constraint.kind == "choices":
                self._check_labels(constraint.spec)
            if not _allowed(base.compute_bitmask()).any():
                raise MlxLocalError(
                    f"{constraint.describe()}: no token of this model's tokenizer can begin it"
                )
            if len(self._matchers) >= 64:
                self._matchers.pop(next(iter(self._matchers)))
            self._matchers[grammar] = base
        return base.deep_copy()

    def _check_labels(self, labels: list[str]) -> None:
        for label in labels:
            ids = self.tokenizer.tokenize_str(label)
            if not ids or self.tokenizer.decode_str(ids) != label:
                raise MlxLocalError(
                    f"choice {label!r} cannot be written with this model's tokenizer "
                    "(it tokenises to nothing or to something else): change the label"
                )


_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer, width: int, stop_ids: frozenset[int]) -> _Vocabulary:
    """The cached `_Vocabulary` of this tokenizer object at this width and stop set."""
    table = _vocabularies.setdefault(tokenizer, {})
    key = (width, stop_ids)
    if key not in table:
        table[key] = _Vocabulary(tokenizer, width, stop_ids)
    return table[key]


def _allowed(bitmask: bytes) -> np.ndarray:
    """llguidance's bitmask (32-bit little-endian words) as one bool per token id."""
    return np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little").view(bool)


class ConstrainedAnswer:
    """One answer's matcher: fed each token produced, it gives the mask for the next one.

    `processor()` is an mlx-lm logits processor (one per answer: in a batch each sequence has
    its own); the decoding loop also `feed`s it each token it receives, so it knows when the
    answer is complete whichever sees a token first.
    """

    def __init__(self, matcher, width: int):
        self._matcher = matcher
        self.width = width
        self.fed = 0

    def feed(self, index: int, token: int) -> None:
        """Take the `index`-th token of the answer (a token already taken is ignored)."""
        if index == self.fed:
            self._matcher.consume_token(token)
            self.fed += 1

    @property
    def complete(self) -> bool:
        """Nothing but the end of the turn can follow (or the matcher failed)."""
        return self._matcher.is_stopped() or self._matcher.is_error()

    @property
    def valid(self) -> bool:
        """The text so far satisfies the constraint."""
        return self._matcher.is_accepting() and not self._matcher.is_error()

    def mask(self, width: int) -> mx.array:
        allowed = _allowed(self._matcher.compute_bitmask())
        if len(allowed) < width:
            allowed = np.concatenate([allowed, np.zeros(width - len(allowed), bool)])
        return mx.array(allowed[:width])

    def processor(self) -> Callable[[mx.array, mx.array], mx.array]:
        """The logits processor: before the k-th token, feed the (k-1)-th (the last of
        `tokens`), then mask every token the constraint rules out."""
        calls = 0

        def process(tokens: mx.array, logits: mx.array) -> mx.array:
            nonlocal calls
            if calls:
                self.feed(calls - 1, int(tokens[-1].item()))
            calls += 1
            return mx.where(self.mask(logits.shape[-1]), logits, float("-inf"))

        return process
