"""`generate`: one prompt in, text streamed out, on mlx-lm's decoding loop.

mlx-lm's `generate_step` owns the model loop (chunked prefill, KV cache, asynchronous decoding).
This module owns what a person sees around it: the chat template, the context limit, the end of
the turn (EOS or the template's end-of-turn token: `decoding.stop_ids`, never shown), stop strings
cut exactly (also when one spans several tokens), and the timings of the summary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .constraints import ConstrainedAnswer, Constraint, from_options
from .data import apply_chat_template, check_text
from .decoding import decodable_only, stop_ids
from .errors import MlxLocalError
from .models import context_length, read_config


@dataclass
class Sampling:
    """How the next token is picked; the defaults are greedy (temperature 0)."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        penalty = self.repetition_penalty
        checks = [
            (_finite(self.temp) and self.temp >= 0, "temp must be ≥ 0 (0 is greedy)"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1] (1: off)"),
            (_integer(self.top_k) and self.top_k >= 0, "top_k must be an integer ≥ 0 (0: off)"),
            (_finite(self.min_p) and 0 <= self.min_p < 1, "min_p must be in [0, 1) (0: off)"),
            (
                penalty is None or (_finite(penalty) and penalty > 0),
                "repetition_penalty must be > 0 (1 turns it off)",
            ),
            (
                self.seed is None or (_integer(self.seed) and 0 <= self.seed < 2**64),
                "seed must be an integer from 0 to 2**64 - 1 (MLX's seed is a uint64)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MlxLocalError(message)

    def sampler(self) -> Callable:
        """mlx-lm's sampler. A top_k at or above the vocabulary size keeps every token, as 0
        does; mlx-lm refuses such a top_k, so it is turned off for logits that narrow."""
        from mlx_lm.sample_utils import make_sampler

        made: dict[int, Callable] = {}

        def sample(logprobs):
            width = logprobs.shape[-1]
            if width not in made:
                top_k = self.top_k if self.top_k < width else 0
                made[width] = make_sampler(
                    self.temp, top_p=self.top_p, min_p=self.min_p, top_k=top_k
                )
            return made[width](logprobs)

        return sample

    def warnings(self, tokenizer) -> list[str]:
        """What a person should know about these settings with this tokenizer."""
        if not self.top_k:
            return []
        vocab = len(tokenizer.get_vocab())
        if self.top_k < vocab:
            return []
        return [
            f"top_k {self.top_k} is not below the vocabulary size ({vocab}): every token is "
            "kept, as with top_k 0"
        ]

    def logits_processors(self) -> list:
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(repetition_penalty=self.repetition_penalty)


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class LoadedModel:
    """A model ready to generate: mlx-lm's model and tokenizer, plus its context length."""

    model: Any
    tokenizer: Any
    context: int | None
    path: Path

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end an answer: EOS and the chat template's end of turn."""
        return stop_ids(self.tokenizer, self.path)

    @cached_property
    def width(self) -> int | None:
        """How many logits the model gives (its embedding rows; may exceed the tokenizer)."""
        return getattr(getattr(self.model, "args", None), "vocab_size", None)

    @cached_property
    def decodable_only(self):
        """The logits processor that keeps sampling to ids the tokenizer can decode, if needed."""
        return decodable_only(self.tokenizer, self.width)

    def constrained(self, constraint: Constraint) -> ConstrainedAnswer:
        """A fresh matcher for one answer under `constraint`."""
        width = self.width or len(self.tokenizer.get_vocab())
        return constraint.start(self.tokenizer, width, self.stop_ids)

    def batch_sampler(self, sampling: Sampling) -> Callable:
        """`sampling`'s sampler over the decodable ids only, for mlx-lm's `BatchGenerator`: the
        mask cannot be a logits processor there, since any processor sends the whole batch down
        its one-sequence-at-a-time path (a slice, a call and a concatenation per sequence per
        step). Log-probabilities are renormalised over the kept ids, as the processor leaves
        them; argmax (temperature 0) needs no renormalising."""
        import mlx.core as mx

        sample, mask = sampling.sampler(), self.decodable_only
        if mask is None:
            return sample
        normalize = sampling.temp > 0

        def masked(logprobs):
            logprobs = mask(None, logprobs)
            if normalize:
                logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
            return sample(logprobs)

        return masked

    def logits_processors(
        self, sampling: Sampling, answer: ConstrainedAnswer | None = None
    ) -> list:
        """What shapes the logits before `sampling` picks: the vocabulary, its penalties, then
        the constraint's mask (which also rules out ids the tokenizer cannot decode)."""
        if answer is not None:
            return [*sampling.logits_processors(), answer.processor()]
        vocabulary = [self.decodable_only] if self.decodable_only else []
        return [*vocabulary, *sampling.logits_processors()]


def load_model(path: str | Path, adapter: str | Path | None = None) -> LoadedModel:
    """Load once, generate often: the result goes to generate, stream, batch and ChatSession."""
    from .models import load

    path = Path(path)
    if not path.is_dir():
        raise MlxLocalError(
            f"{path}: no such model folder; give an MLX checkpoint (make one with "
            "`mlxlocal convert`)"
        )
    model, tokenizer = load(path, adapter)
    return LoadedModel(model, tokenizer, context_length(read_config(path)), path)


def as_loaded(model: str | Path | LoadedModel, adapter: str | Path | None = None) -> LoadedModel:
    """Every entry point takes a folder or a loaded model; this makes it a loaded model."""
    if isinstance(model, LoadedModel):
        if adapter is not None:
            raise MlxLocalError("pass the adapter to load_model(), not to an already loaded model")
        return model
    return load_model(model, adapter)


def render_chat(tokenizer, messages: list[dict[str, Any]], tools: list | None = None) -> list[int]:
    """Token ids of a conversation in the model's chat template, ready for the next answer."""
    options = {"tools": tools} if tools else {}
    return list(apply_chat_template(tokenizer, messages, add_generation_prompt=True, **options))


def encode_prompt(
    tokenizer, prompt: str | Sequence[int], system: str | None = None, chat_template: bool = True
) -> list[int]:
    """Prompt token ids: in the chat template when the model has one, else the plain text."""
    if not isinstance(prompt, str):
        return list(prompt)
    check_text(prompt, "the prompt")
    if system is not None:
        check_text(system, "the system prompt")
    if chat_template and tokenizer.has_chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        return render_chat(tokenizer, [*messages, {"role": "user", "content": prompt}])
    if system:
        raise MlxLocalError(
            "a system prompt needs the model's chat template (this model has none, or it was "
            "turned off): put the instructions in the prompt itself"
        )
    bos = tokenizer.bos_token
    return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))


def fit_context(
    ids: list[int], max_tokens: int, context: int | None, truncate: bool = False
) -> tuple[list[int], int, list[str]]:
    """(ids, max_tokens, warnings) that fit in the model's context.

    A prompt that does not fit is an error, or with `truncate` loses its oldest tokens (keeping
    room for up to half a context of answer); the answer is capped at what is left.
    """
    if not ids:
        raise MlxLocalError("the prompt is empty: give at least one token of text")
    if max_tokens < 1:
        raise MlxLocalError("max_tokens must be ≥ 1")
    warnings = []
    if context is None:
        return ids, max_tokens, warnings
    if len(ids) >= context:
        if not truncate:
            raise MlxLocalError(
                f"the prompt has {len(ids)} tokens but the model's context is {context}: "
                "shorten it, or pass --truncate to drop its oldest tokens"
            )
        keep = context - min(max_tokens, context // 2)
        warnings.append(
            f"prompt truncated from {len(ids)} to its last {keep} tokens (context {context})"
        )
        ids = ids[-keep:]
    if len(ids) + max_tokens > context:
        max_tokens = context - len(ids)
        warnings.append(f"max_tokens capped at {max_tokens} to stay within the context ({context})")
    return ids, max_tokens, warnings


def find_stop(text: str, stop: Sequence[str], start: int, final: bool = False) -> tuple[int, bool]:
    """(end, stopped): `text[:end]` is safe to show; `stopped` when a stop string begins at end.

    Until `final`, a tail that could still grow into a stop string is held back, so no part of
    a stop string is ever shown, even when it arrives over several tokens.
    """
    hits = [i for s in stop if (i := text.find(s, start)) >= 0]
    if hits:
        return min(hits), True
    if final:
        return len(text), False
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text) - start), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return len(text) - hold, False


class Detokenized:
    """Text of a growing token list, released as it becomes safe, cut before any stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._detokenizer = tokenizer.detokenizer
        self.stop = [s for s in stop if s]
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self._detokenizer.add_token(token)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._detokenizer.finalize()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        full = self._detokenizer.text
        end, self.stopped = find_stop(full, self.stop, len(self.text), final)
        new = full[len(self.text) : end]
        self.text += new
        return new


class Answer:
    """One answer that a batch generator produces token by token: its tokens, and its text cut
    before any stop string, without the stop id that ends it (`batch` and `serve` share it)."""

    def __init__(
        self, tokenizer, stop: Sequence[str] = (), constrained: ConstrainedAnswer | None = None
    ):
        self.tokens: list[int] = []
        self._text = Detokenized(tokenizer, stop)
        self.finish_reason: str | None = None
        self.constrained = constrained  # the matcher, under a constraint: it ends the answer

    @property
    def text(self) -> str:
        return self._text.text

    def step(self, token: int, finish_reason: str | None) -> str:
        """Take the next token and the generator's finish reason ("stop" there means a stop
        id: kept in `tokens`, never shown); the text newly safe to show. `finish_reason` is
        set once the answer is over, "stop" also when a stop string was reached."""
        self.tokens.append(token)
        if self.constrained:
            self.constrained.feed(len(self.tokens) - 1, token)
        piece = self._text.add(token) if finish_reason != "stop" else ""
        if self._text.stopped or (self.constrained and self.constrained.complete):
            finish_reason = "stop"
        if finish_reason is not None:
            piece += self._text.finish()
            self.finish_reason = finish_reason
        return piece


@dataclass
class Generation:
    """What one generation produced, with the figures of the summary line."""

    text: str
    tokens: list[int]  # every token the model produced, the stop id included when it ended on one
    finish_reason: str  # "stop" (a stop id or string) or "length" (max_tokens reached)
    prompt_tokens: int
    prompt_seconds: float
    generation_seconds: float
    peak_memory_gb: float
    warnings: list[str] = field(default_factory=list)
    valid: bool | None = None  # under a constraint: whether the text satisfies it

    @property
    def generation_tokens(self) -> int:
        return len(self.tokens)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        # As mlx-lm counts it: tokens over the time after the first one arrived.
        secs = self.generation_seconds
        return self.generation_tokens / secs if secs else 0.0

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
            f"generated: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
            f"peak memory: {self.peak_memory_gb:.3f} GB"
        )

    def to_json(self) -> dict[str, Any]:
        valid = {} if self.valid is None else {"valid": self.valid}
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            **valid,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "prompt_tps": round(self.prompt_tps, 2),
            "generation_tps": round(self.generation_tps, 2),
            "prompt_seconds": round(self.prompt_seconds, 4),
            "generation_seconds": round(self.generation_seconds, 4),
            "peak_memory_gb": round(self.peak_memory_gb, 4),
            "warnings": self.warnings,
        }


class Stream:
    """Iterate for pieces of text as they are produced; `.result` is set once it is exhausted.

    `tokens` and `text` grow as it runs, so a stream stopped early (break, Ctrl-C) still says
    what it produced. `cache`, when given, is an mlx-lm prompt cache holding what precedes `ids`;
    it is extended in place.
    """

    def __init__(
        self,
        lm: LoadedModel,
        ids: list[int],
        *,
        max_tokens: int = 256,
        sampling: Sampling | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        cache: list | None = None,
        warnings: Sequence[str] = (),
        constraint: Constraint | None = None,
    ):
        check_constraint(constraint is not None, stop, ignore_eos)
        self.lm, self.ids, self.max_tokens = lm, ids, max_tokens
        self.answer = lm.constrained(constraint) if constraint else None
        self.sampling = sampling or Sampling()
        self.ignore_eos, self.cache = ignore_eos, cache
        self.warnings = list(warnings)
        self.tokens: list[int] = []
        self.result: Generation | None = None
        self._text = Detokenized(lm.tokenizer, stop)
        self._pieces = self._run()

    @property
    def text(self) -> str:
        return self._text.text

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _run(self) -> Iterator[str]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step, generation_stream, wired_limit

        if self.sampling.seed is not None:
            mx.random.seed(self.sampling.seed)
        stop = frozenset() if self.ignore_eos else self.lm.stop_ids
        mx.reset_peak_memory()
        steps = generate_step(
            mx.array(self.ids),
            self.lm.model,
            max_tokens=self.max_tokens,
            sampler=self.sampling.sampler(),
            logits_processors=self.lm.logits_processors(self.sampling, self.answer),
            prompt_cache=self.cache,
        )
        finish = "length"
        start = time.perf_counter()
        first = last = None
        with wired_limit(self.lm.model, [generation_stream]):
            try:
                for token, _ in steps:
                    last = time.perf_counter()
                    first = first or last
                    self.tokens.append(token)
                    if self.answer:
                        self.answer.feed(len(self.tokens) - 1, token)
                    if token in stop:  # the end of the turn: kept in tokens, never shown
                        finish = "stop"
                        break
                    piece = self._text.add(token)
                    if piece:
                        yield piece
                    if self._text.stopped or (self.answer and self.answer.complete):
                        finish = "stop"
                        break
            finally:
                steps.close()
        piece = self._text.finish()
        if piece:
            yield piece
        self.result = Generation(
            text=self.text,
            tokens=self.tokens,
            finish_reason=finish,
            prompt_tokens=len(self.ids),
            prompt_seconds=(first or start) - start,
            generation_seconds=time.perf_counter() - first if first else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            warnings=self.warnings,
            valid=self.answer.valid if self.answer else None,
        )


def check_constraint(constrained: bool, stop: Sequence[str], ignore_eos: bool) -> None:
    """A constraint decides where an answer ends: stop strings and ignore_eos would fight it."""
    if constrained and any(stop):
        raise MlxLocalError("stop strings cannot be combined with a constraint: it ends answers")
    if constrained and ignore_eos:
        raise MlxLocalError("--ignore-eos cannot be combined with a constraint: it ends answers")


def stream(
    model: str | Path | LoadedModel,
    prompt: str | Sequence[int],
    *,
    adapter: str | Path | None = None,
    system: str | None = None,
    chat_template: bool = True,
    max_tokens: int = 256,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    truncate: bool = False,
    ignore_eos: bool = False,
    choices: Sequence[str] | str | None = None,
    regex: str | None = None,
    json_schema: dict | str | Path | None = None,
    json_object: bool = False,
) -> Stream:
    """Start generating: iterate the result for text pieces, then read its `.result`.

    `model` is an MLX checkpoint folder or a `load_model()` result (load once, generate often).
    A `prompt` string goes through the model's chat template unless `chat_template=False`;
    a list of token ids is used as is. At most one constraint shapes the answer: `choices`
    (labels, or "a,b,c"), `regex` (the whole answer matches), `json_schema` (a dict or a file)
    or `json_object` (any JSON object); the result's `valid` then says whether it was met.
    """
    constraint = from_options(choices, regex, json_schema, json_object)
    for s in stop:
        check_text(s, f"the stop string {s!r}")
    lm = as_loaded(model, adapter)
    sampling = sampling or Sampling()
    ids = encode_prompt(lm.tokenizer, prompt, system, chat_template)
    ids, max_tokens, warnings = fit_context(ids, max_tokens, lm.context, truncate)
    warnings = sampling.warnings(lm.tokenizer) + warnings
    return Stream(
        lm,
        ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        ignore_eos=ignore_eos,
        warnings=warnings,
        constraint=constraint,
    )


def generate(model: str | Path | LoadedModel, prompt: str | Sequence[int], **options) -> Generation:
    """The whole answer at once; takes the options of `stream`."""
    s = stream(model, prompt, **options)
    for _ in s:
        pass
    return s.result
