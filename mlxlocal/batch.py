"""`batch`: every record of a JSONL or CSV file through the model, batched, resumable.

Generation is mlx-lm's `BatchGenerator` (continuous batching: finished sequences leave, waiting
ones join); greedy outputs equal `generate`'s for each record alone. The output is written to
`OUT.partial` in input order, complete lines only, each write flushed and fsynced, so a kill -9
leaves at worst a torn last line; a re-run drops it, checks the ids already written against the
input and continues. When every record is done, `OUT.partial` becomes OUT: renamed for a JSON
lines OUT (`.jsonl`/`.json`), written out as a table for a `.csv`/`.tsv` OUT (the input's
columns, then the added ones), so resuming works the same for every output format.
"""

from __future__ import annotations

import csv
import os
import re
import string
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

from .checkpoint.atomic import atomic_file, check_output, make_parent
from .checkpoint.inputs import JSONProblem, decode_json
from .checkpoint.jsonout import finite, non_finite_at, strict_dumps
from .choices import ON_ERROR
from .constraints import (
    ConstrainedAnswer,
    Constraint,
    choice_constraint,
    from_options,
    split_choices,
)
from .data import FileFormat, Row, data_file, file_format, iter_rows
from .errors import MlxLocalError
from .generate import (
    Answer,
    LoadedModel,
    Sampling,
    as_loaded,
    check_constraint,
    encode_prompt,
    fit_context,
)
from .progress import bar

# Fields every output record gets; an input record may not already have them.
ADDED_FIELDS = ("output", "finish_reason", "generated_tokens", "error")
# The output's format, from its extension.
OUTPUT_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv"}
# The fields a record's columns can be mapped to (--field NAME=COLUMN).
BATCH_FIELDS = ("prompt", "system")


@dataclass
class BatchResult:
    output: Path
    records: int
    resumed: int  # records already in the output from an interrupted run
    errors: list[str]
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    peak_memory_gb: float
    warnings: list[str] = field(default_factory=list)
    prefix_tokens: int = 0  # prompt tokens not processed: taken from a shared prefix's cache

    def summary(self) -> str:
        done = self.records - self.resumed
        rate = done / self.seconds if self.seconds else 0.0
        tps = self.generated_tokens / self.seconds if self.seconds else 0.0
        resumed = f" ({self.resumed} done before)" if self.resumed else ""
        return (
            f"{self.records} records{resumed} → {self.output}: {done} in {self.seconds:.1f} s, "
            f"{rate:.2f} records/s, {self.generated_tokens} tokens generated ({tps:.1f} tok/s), "
            f"{len(self.errors)} error(s) | peak memory: {self.peak_memory_gb:.3f} GB"
        )


def _record_id(row: Row) -> Any:
    """A record's id in the output: its own `id` field, else its line number."""
    return row.values["id"] if row.values and "id" in row.values else row.line


MAX_FORMAT_WIDTH = 1000


def output_kind(output: Path) -> str:
    """`jsonl` or `csv`, from the output's extension; any other is refused."""
    kind = OUTPUT_KINDS.get(output.suffix.lower())
    if kind is None:
        raise MlxLocalError(
            f"--output {output}: name the output .jsonl (JSON lines) or .csv/.tsv (a table); "
            "its extension chooses the format"
        )
    return kind


def prompt_field(
    first: Row | None, field: str | None, fields: dict[str, str], note: Callable[[str], None]
) -> str:
    """The column the prompt comes from: named (--field), else `prompt`, else `text`."""
    if field or fields.get("prompt"):
        return field or fields["prompt"]
    values = first.values if first is not None and first.values else {}
    present = [name for name in ("prompt", "text") if name in values]
    if len(present) == 2:
        note(
            f"{first.file}: prompts from the 'prompt' column (it has 'text' too); "
            "pass --field text to use that one"
        )
    return present[0] if present else "text"


def prompt_builder(template: str | None, field_name: str) -> Callable[[dict[str, Any]], str]:
    """The function that turns a record into its prompt text: a template, or one field."""
    if template is None:

        def from_field(fields: dict[str, Any]) -> str:
            if field_name not in fields:
                raise MlxLocalError(
                    f"no field {field_name!r} (fields: {', '.join(fields) or 'none'}); name the "
                    "prompt's field with --field or write a --template"
                )
            return str(fields[field_name])

        return from_field

    try:
        parts = [(n, spec) for _, n, spec, _ in string.Formatter().parse(template) if n is not None]
    except ValueError as e:
        raise MlxLocalError(f"template: {e}; write a literal brace as {{{{ or }}}}") from e
    names = {name for name, _ in parts}
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise MlxLocalError(
            f"template: {{{bad[0]}}} is not a field name; use plain names like {{text}}"
        )
    for name, spec in parts:
        # A width is allocated whole ({x:>2000000000} is 2 GB a record), and a nested spec
        # ({x:{y}}) would let each record choose its own.
        if "{" in spec or any(int(w) > MAX_FORMAT_WIDTH for w in re.findall(r"\d+", spec)):
            raise MlxLocalError(
                f"template: {{{name}:{spec[:40]}}} asks for a width or precision above "
                f"{MAX_FORMAT_WIDTH} or taken from a field; write a plain {{{name}}}"
            )

    def from_template(fields: dict[str, Any]) -> str:
        missing = sorted(names - set(fields))
        if missing:
            raise MlxLocalError(
                f"the template uses {{{missing[0]}}} but the record has no field "
                f"{missing[0]!r} (fields: {', '.join(fields) or 'none'})"
            )
        try:
            return template.format_map(fields)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            # A format spec the value cannot take ({n:d} of a string, {x:{y}} nested), or an
            # index or attribute of a field ({x[0]}, {x.y}) the value does not have.
            raise MlxLocalError(
                f"the template cannot format this record ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]}); fix --template or the record"
            ) from e

    return from_template


def record_constraint(
    choices: Sequence[str] | str | None = None,
    regex: str | None = None,
    json_schema: dict | str | Path | None = None,
    json_object: bool = False,
) -> tuple[Constraint | None, Callable[[dict[str, Any]], Constraint] | None, Any]:
    """(the run's constraint, or a function giving each record's, and what settings record).

    `choices="{labels}"` takes each record's labels from its field `labels`: a list of
    strings, or one string "a,b,c".
    """
    field = re.fullmatch(r"\{(\w+)\}", choices.strip()) if isinstance(choices, str) else None
    if field is None:
        constraint = from_options(choices, regex, json_schema, json_object)
        return constraint, None, constraint.to_json() if constraint else None
    if regex is not None or json_schema is not None or json_object:
        raise MlxLocalError("give one constraint: per-record choices or another, not both")
    name = field.group(1)

    def labels_of(fields: dict[str, Any]) -> Constraint:
        if name not in fields:
            raise MlxLocalError(
                f"--choices {{{name}}}: the record has no field {name!r} (fields: "
                f"{', '.join(fields) or 'none'})"
            )
        value = fields[name]
        if isinstance(value, str):
            value = split_choices(value)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MlxLocalError(
                f'field {name!r} must hold the labels as a list of strings or as "a,b,c"'
            )
        return choice_constraint(value)

    return None, labels_of, {"kind": "choices", "field": name}


def batch(
    model: str | Path | LoadedModel,
    input: str | Path,
    output: str | Path,
    *,
    adapter: str | Path | None = None,
    template: str | None = None,
    field: str | None = None,
    fields: dict[str, str] | None = None,
    encoding: str | None = None,
    system: str | None = None,
    chat_template: bool = True,
    max_tokens: int = 256,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (),
    batch_size: int = 32,
    on_error: str = "stop",
    truncate: bool = False,
    ignore_eos: bool = False,
    force: bool = False,
    note: Callable[[str], None] = lambda _: None,
    choices: Sequence[str] | str | None = None,
    regex: str | None = None,
    json_schema: dict | str | Path | None = None,
    json_object: bool = False,
    prefix_cache: bool = True,
) -> BatchResult:
    """Generate for every record of `input`, one output record per input record, in order.

    Each output record is the input's fields plus `id` (the record's own, or its line number),
    `output`, `finish_reason` and `generated_tokens`; a bad record (with `on_error="skip"`)
    gets `error` instead. A constraint (`choices`, `regex`, `json_schema`, `json_object`: see
    `generate.stream`; `choices="{field}"` reads each record's labels from that field) adds
    `valid`: false when max_tokens cut the answer short of it. Re-running after an
    interruption continues where it stopped.
    The prompt is `template` filled from the record, else the column `field` (or
    `fields["prompt"]`; by default `prompt`, else `text`); `fields["system"]` names a column
    holding each record's system prompt. `encoding` names the input's (default UTF-8, or what
    its byte-order mark says). `note` receives messages meant for a person. With
    `prefix_cache`, the token prefix every prompt of a chunk shares (a template's instruction,
    a system prompt) is processed once and its KV cache reused by each record (same outputs).
    """
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    if on_error not in ON_ERROR:
        raise MlxLocalError(f"on_error must be 'skip' or 'stop', not {on_error!r}")
    if batch_size < 1:
        raise MlxLocalError("batch_size must be ≥ 1")
    input, output = data_file(input), Path(output)
    kind = output_kind(output)
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(BATCH_FIELDS))
    if unknown:
        raise MlxLocalError(
            f"--field {unknown[0]}=…: batch maps only {', '.join(BATCH_FIELDS)} to columns"
        )
    sampling = sampling or Sampling()
    form = file_format(input, encoding)
    total, first = 0, None
    for row in iter_rows(input, form=form):
        total += 1
        first = first or (row if row.values else None)
    field = None if template else prompt_field(first, field, fields, note)
    build_prompt = prompt_builder(template, field)
    constraint, per_record, setting = record_constraint(choices, regex, json_schema, json_object)
    constrained = constraint is not None or per_record is not None
    check_constraint(constrained, stop, ignore_eos)
    system_field = fields.get("system")
    check_output(output, force)
    make_parent(output)  # OUT.partial is written beside OUT from the first record on
    lm = as_loaded(model, adapter)
    settings = {
        "input": str(input.resolve()),
        "model": str(lm.path.resolve()),
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "encoding": form.encoding,
        "template": template,
        "field": field,
        "system": system,
        "system_field": system_field,
        "chat_template": chat_template,
        "max_tokens": max_tokens,
        "sampling": asdict(sampling),
        "stop": list(stop),
        "truncate": truncate,
        "ignore_eos": ignore_eos,
        **({"constraint": setting} if constrained else {}),
    }
    out = ResumableOutput(output, settings, force, _table_format(kind, output, form))
    rows = iter_rows(input, form=form)
    resumed = out.resume(rows, input)
    if resumed:
        note(f"resuming: {resumed} of {total} records already in {out.partial}")

    def prepare(row: Row) -> tuple[list[int], int, list[str], ConstrainedAnswer | None]:
        """(prompt ids, max_tokens, warnings, the answer's matcher) for a record, or an
        MlxLocalError saying why not."""
        if row.problem:
            raise MlxLocalError(f"{row.problem}; {row.fix}" if row.fix else row.problem)
        for name, value in row.values.items():
            if (where := non_finite_at(value, name)) is not None:
                raise MlxLocalError(
                    f"{where} is NaN or Infinity, which JSON output cannot hold; write a "
                    "number, a string or null"
                )
        clash = [k for k in ADDED_FIELDS + ("valid",) * constrained if k in row.values]
        if clash:
            raise MlxLocalError(
                f"the record already has a field {clash[0]!r}, which the output would "
                "overwrite; rename that field"
            )
        own_system = system
        if system_field is not None:
            if system_field not in row.values:
                raise MlxLocalError(
                    f"no field {system_field!r} for the system prompt (fields: "
                    f"{', '.join(row.values) or 'none'})"
                )
            own_system = str(row.values[system_field]) or system
        ids = encode_prompt(lm.tokenizer, build_prompt(row.values), own_system, chat_template)
        wanted = per_record(row.values) if per_record else constraint
        answer = lm.constrained(wanted) if wanted else None
        return *fit_context(ids, max_tokens, lm.context, truncate), answer

    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    gen = BatchGenerator(
        lm.model,
        max_tokens=max_tokens,
        stop_tokens=[] if ignore_eos else [[t] for t in sorted(lm.stop_ids)],
        # The vocabulary mask is in the sampler, not a processor: see `batch_sampler`.
        sampler=lm.batch_sampler(sampling),
        logits_processors=sampling.logits_processors(),
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    shared = SharedPrefix(lm.model, gen.prefill_step_size) if prefix_cache else None
    mx.reset_peak_memory()
    result = BatchResult(output, total, resumed, [], 0, 0, 0.0, 0.0)
    start = time.perf_counter()
    progress = bar("batch", total=total, unit="rec")
    progress.update(resumed)

    def read_chunk(
        n: int,
    ) -> tuple[list[tuple[list[int], int, _Item]], bool, tuple[str, bool] | None]:
        """Up to `n` more records: (ids, max_tokens, item) for those to generate for, whether
        the input is exhausted, and what stopped the run (with on_error="stop": the message,
        and whether it says what to do about the whole file)."""
        fresh, read = [], 0
        for row in islice(rows, n):
            read += 1
            item = _Item(row, lm.tokenizer, stop)
            try:
                ids, record_max, warnings, item.answer.constrained = prepare(row)
            except MlxLocalError as e:
                message = f"{input}:{row.line}: {e}"
                if on_error == "stop":
                    return fresh, False, (message, row.fix is not None)
                note(f"skipped {message}")
                result.errors.append(message)
                item.finish(error=str(e))
                progress.update(1)
            else:
                result.warnings += [f"{input}:{row.line}: {w}" for w in warnings]
                result.prompt_tokens += len(ids)
                fresh.append((ids, record_max, item))
            items.append(item)
        return fresh, read < n, None

    # Records are read a chunk at a time and each chunk goes in sorted by prompt length, so the
    # sequences batched together have similar lengths (less padding, shorter attention). The
    # next chunk goes in when the generator is about to run short; at most two chunks are in
    # memory, and their records are written in input order as soon as they are done.
    chunk = 8 * batch_size
    items: deque[_Item] = deque()  # read, not yet written, in input order
    active: dict[int, _Item] = {}  # in the generator, by its uid
    failure, exhausted = None, False
    try:
        with out:
            while active or not (exhausted or failure):
                if not (exhausted or failure) and len(active) <= batch_size:
                    fresh, exhausted, failure = read_chunk(chunk)
                    fresh.sort(key=lambda f: len(f[0]))
                    if fresh:
                        # A processor per sequence only under a constraint: any processor
                        # sends mlx-lm's generator down its (slower) per-sequence path.
                        processors = [
                            lm.logits_processors(sampling, f[2].answer.constrained) for f in fresh
                        ] if constrained else None  # fmt: skip
                        prompts, caches, history = [f[0] for f in fresh], None, None
                        if shared is not None:
                            prompts, caches, history = shared.split(prompts)
                            result.prefix_tokens += sum(len(f[0]) for f in fresh) - sum(
                                map(len, prompts)
                            )
                        uids = gen.insert(
                            prompts,
                            [f[1] for f in fresh],
                            caches=caches,
                            all_tokens=history,
                            logits_processors=processors,
                        )
                        active.update((uid, f[2]) for uid, f in zip(uids, fresh, strict=True))
                for response in gen.next_generated() if active else []:
                    item = active[response.uid]
                    if item.step(response.token, response.finish_reason):
                        del active[response.uid]
                        if response.finish_reason is None:  # a stop string, not the generator
                            gen.remove([response.uid])
                        result.generated_tokens += len(item.tokens)
                        progress.update(1)
                tps = result.generated_tokens / (time.perf_counter() - start)
                progress.set_postfix_str(f"{tps:.1f} tok/s")
                out.append(_finished(items))
    finally:
        gen.close()
        progress.close()
    result.seconds = time.perf_counter() - start
    result.peak_memory_gb = mx.get_peak_memory() / 1e9
    if failure:
        message, whole_file = failure
        kept = f"the {out.partial.name} output so far is kept and a re-run continues"
        if whole_file:  # e.g. another encoding: the message says what to do
            raise MlxLocalError(f"{message} ({kept})")
        raise MlxLocalError(f"{message} — fix the line ({kept}), or pass --on-error skip")
    out.finish()
    return result


class SharedPrefix:
    """The token prefix all prompts of a chunk share, processed once: each record's sequence
    starts from its KV cache and processes only its own suffix.

    One cache object serves every record of the chunk: mlx-lm's batch merges the records'
    caches into new arrays and never writes to them, so the prefix is held once, not once per
    waiting record (serve's `LRUPromptCache` hands out a deep copy per fetch: right for a chat's
    next turn, 8 × batch size copies here). It is never extended in place (records still waiting
    may hold it); a chunk whose prompts do not all start with it gets a new one.
    """

    MIN_TOKENS = 16  # shorter shared prefixes are not worth a separate pass

    def __init__(self, model, step: int):
        self.model, self.step = model, step
        self.tokens: list[int] = []
        self.cache: list | None = None

    def split(self, prompts: list[list[int]]) -> tuple[list[list[int]], list | None, list | None]:
        """(each prompt's tokens after the shared prefix, the prefix cache for each, the prefix
        tokens for each: the history a repetition penalty sees), or the prompts unchanged and
        None, None where they share too little (or the model's cache cannot be shared). At
        least one token of each prompt is left to feed."""
        room = max(min(map(len, prompts)) - 1, 0)
        if not self._starts_all(prompts, self.tokens) or len(self.tokens) > room:
            self._prefill(common_prefix(prompts)[:room])
        if self.cache is None:
            return prompts, None, None
        n = len(self.tokens)
        # A list each: mlx-lm appends the processed tokens to it in place.
        history = [list(self.tokens) for _ in prompts]
        return [p[n:] for p in prompts], [self.cache] * len(prompts), history

    @staticmethod
    def _starts_all(prompts: list[list[int]], prefix: list[int]) -> bool:
        return bool(prefix) and all(p[: len(prefix)] == prefix for p in prompts)

    def _prefill(self, tokens: list[int]) -> None:
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        self.tokens, self.cache = [], None
        if len(tokens) < self.MIN_TOKENS:
            return
        cache = make_prompt_cache(self.model)
        # Only plain KV caches merge by copying; others (rotating, recurrent) go the usual way.
        if not all(type(c) is KVCache for c in cache):
            return
        ids = mx.array(tokens)[None]
        for start in range(0, len(tokens), self.step):
            self.model(ids[:, start : start + self.step], cache=cache)
            mx.eval([c.state for c in cache])
        self.tokens, self.cache = tokens, cache


def common_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest token prefix every prompt starts with."""
    first, n = prompts[0], min(map(len, prompts))
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return first[:n]


class _Item:
    """One record on its way through the model."""

    def __init__(self, row: Row, tokenizer, stop: Sequence[str]):
        self.row = row
        self.answer = Answer(tokenizer, stop)
        self.result: dict[str, Any] | None = None

    @property
    def tokens(self) -> list[int]:
        return self.answer.tokens

    def step(self, token: int, finish_reason: str | None) -> bool:
        """Take the next token; True when this record is finished."""
        self.answer.step(token, finish_reason)
        if self.answer.finish_reason is None:
            return False
        matcher = self.answer.constrained
        valid = {"valid": matcher.valid} if matcher else {}
        self.finish(output=self.answer.text, finish_reason=self.answer.finish_reason, **valid)
        return True

    def finish(self, **added: Any) -> None:
        if "output" in added:
            added["generated_tokens"] = len(self.tokens)
        self.result = {"id": _record_id(self.row), **(self.row.values or {}), **added}


def _finished(items: deque[_Item]) -> list[dict[str, Any]]:
    """The results of the finished records at the head of the queue, taken off it."""
    done = []
    while items and items[0].result is not None:
        done.append(items.popleft().result)
    return done


def _json_line(record: dict[str, Any]) -> bytes:
    """One output line in UTF-8; a record whose input held a lone surrogate (a JSON `\\ud800`
    escape) keeps it as that escape, since UTF-8 cannot hold it."""
    try:
        return (strict_dumps(record, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (strict_dumps(record) + "\n").encode()


class ResumableOutput:
    """`OUT.partial` and its settings file: what lets an interrupted `batch` continue.

    Results are appended as complete lines, each write flushed and fsynced, so a kill leaves at
    worst a torn last line. A re-run with the same settings drops that line, checks the ids
    already written against the input and appends after them; `finish` renames the partial
    file to OUT.
    """

    def __init__(
        self,
        output: Path,
        settings: dict[str, Any],
        force: bool,
        table: FileFormat | None = None,
    ):
        self.output = output
        self.table = table  # write OUT as this table, not as the JSON lines of the partial
        self.partial = output.with_name(output.name + ".partial")
        self.settings_file = output.with_name(output.name + ".partial-settings.json")
        self.settings = settings
        self._file: BinaryIO | None = None
        if force:
            self.partial.unlink(missing_ok=True)

    def resume(self, rows: Iterator[Row], input: Path) -> int:
        """How many records an interrupted run already wrote; `rows` is advanced past them.

        With none written, the settings are recorded for a later re-run to compare against.
        """
        done = self._check_written(rows, input) if self._has_records() else 0
        if not done:
            with atomic_file(self.settings_file, force=True) as tmp:
                tmp.write_text(strict_dumps(self.settings, indent=2))
        return done

    def _has_records(self) -> bool:
        """Whether the partial output holds a complete record (one that stopped before
        writing any is a failed attempt, replaced whatever its settings)."""
        if not self.partial.exists():
            return False
        with open(self.partial, "rb") as f:
            if b"\n" in f.readline():
                return True
        self.partial.unlink()
        return False

    def _check_written(self, rows: Iterator[Row], input: Path) -> int:
        try:
            before = decode_json(self.settings_file.read_bytes())
        except (OSError, JSONProblem):
            before = None
        if before != self.settings:
            raise MlxLocalError(
                f"{self.partial} is from an interrupted run with other settings "
                f"({_changes(before, self.settings)}): re-run with the same ones to continue, "
                "or pass --force to discard it and start over"
            )
        done = good = 0  # complete lines, and their bytes
        with open(self.partial, "rb+") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn by the interruption: cut off below
                row = next(rows, None)
                try:
                    written = decode_json(raw).get("id")
                except (JSONProblem, AttributeError):
                    written = "(not a JSON object)"
                if row is None or written != finite(_record_id(row)):
                    raise MlxLocalError(
                        f"{self.partial} line {done + 1} (id {written!r}) does not match "
                        f"{input} (the input changed since the interrupted run): pass --force "
                        "to start over"
                    )
                done += 1
                good += len(raw)
            f.truncate(good)
        return done

    def __enter__(self) -> ResumableOutput:
        self._file = open(self.partial, "ab")
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def append(self, results: list[dict[str, Any]]) -> None:
        """Append output records durably: complete lines, flushed and fsynced."""
        if results:
            self._file.write(b"".join(_json_line(r) for r in results))
            self._file.flush()
            os.fsync(self._file.fileno())

    def finish(self) -> None:
        """Every record is written: the output takes its name, the settings are dropped."""
        if self.table is None:
            os.replace(self.partial, self.output)
        else:
            with atomic_file(self.output, force=True) as tmp:
                _write_table(self.partial, tmp, self.table)
            self.partial.unlink()
        self.settings_file.unlink(missing_ok=True)


def _changes(before: Any, now: dict[str, Any]) -> str:
    """Which settings differ, with their values then and now."""
    if not isinstance(before, dict):
        return f"its settings file {'is unreadable' if before is not None else 'is missing'}"

    def shown(value: Any) -> str:
        text = strict_dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + "…"

    changed = [
        f"{key} changed: {shown(before.get(key))} → {shown(now[key])}"
        for key in now
        if before.get(key) != now[key]
    ]
    return "; ".join(changed) or "unknown settings changed"


def _table_format(kind: str, output: Path, input: FileFormat) -> FileFormat | None:
    """How a .csv/.tsv output is written: the input's delimiter for a .csv from a CSV, a tab
    for .tsv, else a comma; UTF-8, with a BOM when the input had one or was in another
    encoding (so Excel, which reads a BOM-less file in the local code page, reads it right)."""
    if kind != "csv":
        return None
    if output.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        delimiter = input.delimiter if input.kind == "csv" else ","
    bom = input.bom or input.encoding != "utf-8"
    return FileFormat("csv", "utf-8", bom, delimiter)


def _write_table(partial: Path, out: Path, table: FileFormat) -> None:
    """The partial's JSON lines as a table: every field seen, in order of first appearance."""
    columns: dict[str, None] = {}
    with open(partial, "rb") as f:
        for raw in f:
            columns.update(dict.fromkeys(decode_json(raw)))

    def cell(value: Any) -> str:
        if isinstance(value, str):
            return value
        return "" if value is None else strict_dumps(value, ensure_ascii=False)

    with open(out, "w", encoding="utf-8-sig" if table.bom else "utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=table.delimiter, lineterminator="\r\n")
        writer.writerow(columns)
        with open(partial, "rb") as records:
            for raw in records:
                record = decode_json(raw)
                writer.writerow([cell(record.get(name)) for name in columns])
