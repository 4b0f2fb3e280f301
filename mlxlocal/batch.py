"""`batch`: every record of a JSONL or CSV file through the model, batched, resumable.

Generation is mlx-lm's `BatchGenerator` (continuous batching: finished sequences leave, waiting
ones join); greedy outputs equal `generate`'s for each record alone. The output is written to
`OUT.partial` in input order, complete lines only, each write flushed and fsynced, so a kill -9
leaves at worst a torn last line; a re-run drops it, checks the ids already written against the
input and continues. When every record is done, `OUT.partial` is renamed to OUT.
"""

from __future__ import annotations

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

from .checkpoint.atomic import atomic_file, check_output
from .checkpoint.inputs import JSONProblem, decode_json
from .checkpoint.jsonout import finite, non_finite_at, strict_dumps
from .choices import ON_ERROR
from .data import Row, data_file, iter_rows
from .errors import MlxLocalError
from .generate import (
    Detokenized,
    LoadedModel,
    Sampling,
    as_loaded,
    encode_prompt,
    fit_context,
)
from .progress import bar

# Fields every output record gets; an input record may not already have them.
ADDED_FIELDS = ("output", "finish_reason", "generated_tokens", "error")


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


def batch(
    model: str | Path | LoadedModel,
    input: str | Path,
    output: str | Path,
    *,
    adapter: str | Path | None = None,
    template: str | None = None,
    field: str = "text",
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
) -> BatchResult:
    """Generate for every record of `input`, one output record per input record, in order.

    Each output record is the input's fields plus `id` (the record's own, or its line number),
    `output`, `finish_reason` and `generated_tokens`; a bad record (with `on_error="skip"`)
    gets `error` instead. Re-running after an interruption continues where it stopped.
    `note` receives progress messages meant for a person.
    """
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    if on_error not in ON_ERROR:
        raise MlxLocalError(f"on_error must be 'skip' or 'stop', not {on_error!r}")
    if batch_size < 1:
        raise MlxLocalError("batch_size must be ≥ 1")
    input, output = data_file(input), Path(output)
    sampling = sampling or Sampling()
    build_prompt = prompt_builder(template, field)
    total = sum(1 for _ in iter_rows(input))
    check_output(output, force)
    lm = as_loaded(model, adapter)
    settings = {
        "input": str(input.resolve()),
        "model": str(lm.path.resolve()),
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "template": template,
        "field": None if template else field,
        "system": system,
        "chat_template": chat_template,
        "max_tokens": max_tokens,
        "sampling": asdict(sampling),
        "stop": list(stop),
        "truncate": truncate,
        "ignore_eos": ignore_eos,
    }
    out = ResumableOutput(output, settings, force)
    rows = iter_rows(input)
    resumed = out.resume(rows, input)
    if resumed:
        note(f"resuming: {resumed} of {total} records already in {out.partial}")

    def prepare(row: Row) -> tuple[list[int], int, list[str]]:
        """(prompt ids, max_tokens, warnings) for a record, or an MlxLocalError saying why not."""
        if row.problem:
            raise MlxLocalError(row.problem)
        for name, value in row.values.items():
            if (where := non_finite_at(value, name)) is not None:
                raise MlxLocalError(
                    f"{where} is NaN or Infinity, which JSON output cannot hold; write a "
                    "number, a string or null"
                )
        clash = [k for k in ADDED_FIELDS if k in row.values]
        if clash:
            raise MlxLocalError(
                f"the record already has a field {clash[0]!r}, which the output would "
                "overwrite; rename that field"
            )
        ids = encode_prompt(lm.tokenizer, build_prompt(row.values), system, chat_template)
        return fit_context(ids, max_tokens, lm.context, truncate)

    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    gen = BatchGenerator(
        lm.model,
        max_tokens=max_tokens,
        stop_tokens=[] if ignore_eos else [[t] for t in sorted(lm.stop_ids)],
        sampler=sampling.sampler(),
        logits_processors=lm.logits_processors(sampling),
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    mx.reset_peak_memory()
    result = BatchResult(output, total, resumed, [], 0, 0, 0.0, 0.0)
    start = time.perf_counter()
    progress = bar("batch", total=total, unit="rec")
    progress.update(resumed)

    def read_chunk(n: int) -> tuple[list[tuple[list[int], int, _Item]], bool, str | None]:
        """Up to `n` more records: (ids, max_tokens, item) for those to generate for, whether
        the input is exhausted, and what stopped the run (with on_error="stop")."""
        fresh, read = [], 0
        for row in islice(rows, n):
            read += 1
            item = _Item(row, lm.tokenizer, stop)
            try:
                ids, record_max, warnings = prepare(row)
            except MlxLocalError as e:
                message = f"{input}:{row.line}: {e}"
                if on_error == "stop":
                    return fresh, False, message
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
                        uids = gen.insert([f[0] for f in fresh], [f[1] for f in fresh])
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
        raise MlxLocalError(
            f"{failure} — fix the line (the {out.partial.name} output so far is kept and a "
            "re-run continues), or pass --on-error skip"
        )
    out.finish()
    return result


class _Item:
    """One record on its way through the model."""

    def __init__(self, row: Row, tokenizer, stop: Sequence[str]):
        self.row = row
        self.tokens: list[int] = []
        self.text = Detokenized(tokenizer, stop)
        self.result: dict[str, Any] | None = None

    def step(self, token: int, finish_reason: str | None) -> bool:
        """Take the next token; True when this record is finished."""
        self.tokens.append(token)
        if finish_reason != "stop":  # "stop" from the generator means a stop id: not shown
            self.text.add(token)
        if self.text.stopped:
            finish_reason = "stop"
        if finish_reason is None:
            return False
        self.text.finish()
        self.finish(output=self.text.text, finish_reason=finish_reason)
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

    def __init__(self, output: Path, settings: dict[str, Any], force: bool):
        self.output = output
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
        done = self._check_written(rows, input) if self.partial.exists() else 0
        if not done:
            with atomic_file(self.settings_file, force=True) as tmp:
                tmp.write_text(strict_dumps(self.settings, indent=2))
        return done

    def _check_written(self, rows: Iterator[Row], input: Path) -> int:
        try:
            before = decode_json(self.settings_file.read_bytes())
        except (OSError, JSONProblem):
            before = None
        if before != self.settings:
            changed = sorted(
                k for k in self.settings if not before or before.get(k) != self.settings[k]
            )
            raise MlxLocalError(
                f"{self.partial} is from an interrupted run with other settings "
                f"({', '.join(changed) or 'unknown'} changed): re-run with the same ones to "
                "continue, or pass --force to start over"
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
        os.replace(self.partial, self.output)
        self.settings_file.unlink(missing_ok=True)
