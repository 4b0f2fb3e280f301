"""The one data layer: JSONL/CSV rows → samples → token ids with loss weights.

Training, evaluation, `batch` and `recipes validate` all read files here, so a file reads the
same everywhere:
- `.jsonl`: one JSON object a line, blank lines skipped; `.csv`/`.tsv`: a header row, then one
  row a record; quoted cells may hold delimiters and newlines, blank lines skipped. The
  delimiter of a `.csv` is sniffed among `,` `;` and tab (Excel writes `;` where the decimal
  comma is local); a `.tsv` is tab-separated.
- UTF-8, with or without a byte-order mark (as Excel saves "CSV UTF-8"); UTF-16/32 with a
  byte-order mark (Excel's "Unicode Text"); any other encoding when named (`encoding`, i.e.
  `--encoding` or `data.encoding`): guessing between Latin-1, cp1252 and the rest from the bytes
  is unreliable, so a byte that is not UTF-8 is named (its line and byte offset) with the fix.
  LF or CRLF line ends.
- A record that cannot be read (not JSON, not an object, a CSV row with more or fewer cells than
  the header, not in the encoding) is a bad row named by `file:line` (the line it starts on);
  the caller stops on it or skips it (`data.bad_lines`, `batch --on-error`). A CSV the parser
  gives up on stops the read.

Four formats: plain `text`, `prompt`/`completion`, chat `messages` (OpenAI style, `tools`
allowed) and `instruction`/`input`/`output`. Conversations are rendered with the model's chat
template; the loss covers every assistant turn, found by rendering each turn's prefix and
diffing token ids, so it works for any template without knowing its markup.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args

import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from .checkpoint.inputs import JSONProblem, decode_json, regular_file
from .errors import MlxLocalError

__all__ = [
    "BadRow",
    "Batch",
    "DataReport",
    "DataSection",
    "Example",
    "Pair",
    "Row",
    "Sample",
    "apply_chat_template",
    "builtin_dataset",
    "check_text",
    "collate",
    "data_file",
    "data_format",
    "describe_dataset",
    "has_chat_template",
    "FileFormat",
    "field_mapping",
    "file_format",
    "iter_rows",
    "load_examples",
    "parse_row",
    "read_rows",
    "tokenize_sample",
]

# The fields each format needs (our names; data.fields maps them to the file's names).
REQUIRED = {
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
}
NOTES_KEPT = 20
PAD_MULTIPLE = 8  # batch lengths are rounded up to this, so few shapes are compiled
DELIMITERS = ",;\t"
SNIFF_BYTES = 64 * 1024
# Byte-order marks, longest first (UTF-32 LE's starts with UTF-16 LE's).
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

FieldName = Literal[
    "text",
    "prompt",
    "completion",
    "messages",
    "instruction",
    "input",
    "output",
    "system",
    "tools",
    "chosen",
    "rejected",
]
FIELD_NAMES: tuple[str, ...] = get_args(FieldName)


class DataSection(BaseModel):
    """A recipe's `data` section: the files and how their rows become examples.

    Defined here, not in recipe.py, so that this layer can take it typed while recipe.py
    (which validates recipes against these files) imports this one.
    """

    model_config = ConfigDict(extra="forbid")

    train: str = Field(min_length=1)
    valid: str | None = None
    valid_fraction: float | None = Field(None, gt=0, lt=1)
    format: Literal["auto", "text", "completion", "chat", "instruction", "preference"] = "auto"
    fields: dict[FieldName, str] = {}
    system_prompt: str | None = None
    train_on_prompt: bool = False
    max_length: int = Field(2048, ge=2)
    too_long: Literal["truncate", "drop"] = "truncate"
    packing: bool = True
    bad_lines: Literal["error", "skip"] = "error"
    encoding: str | None = None  # None: UTF-8, or what a byte-order mark says

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_encoding(value)
            except MlxLocalError as e:  # pydantic names the key and its line
                raise PydanticCustomError("encoding", str(e)) from None
        return value


@dataclass
class Example:
    tokens: list[int]
    weights: list[int]  # 1 where tokens[i] is a token the loss should predict


@dataclass
class Pair:
    """A preference: the same prompt with the answer preferred and the one rejected."""

    chosen: Example
    rejected: Example

    @property
    def tokens(self) -> list[int]:
        """The longer side's tokens: the width a batch row must have for this pair."""
        return max(self.chosen.tokens, self.rejected.tokens, key=len)


@dataclass
class DataReport:
    file: str
    format: str = ""
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    bad_lines: int = 0
    identical: int = 0  # preference pairs whose two answers are the same (dropped)
    notes: list[str] = field(default_factory=list)  # "file:line: what happened", first few
    system_merged: bool = False  # see SYSTEM_MERGED

    def note(self, where: str, what: str) -> None:
        if len(self.notes) < NOTES_KEPT:
            self.notes.append(f"{where}: {what}")

    def summary(self) -> str:
        parts = [
            f"{self.examples:,} examples ({self.format})",
            f"{self.tokens:,} tokens, {self.trained_tokens:,} trained",
        ]
        for name in ("truncated", "dropped", "bad_lines", "identical"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name):,} {name.replace('_', ' ')}")
        if self.system_merged:
            parts.append(SYSTEM_MERGED)
        return f"{self.file}: " + ", ".join(parts)


@dataclass
class Row:
    """One record of a data file, or why it could not be read."""

    file: str  # the file's name, for messages
    line: int  # where the record starts, 1-based
    values: dict[str, Any] | None  # None when the record could not be read
    problem: str | None = None
    fix: str | None = None  # what to do about `problem`, when not "fix the line"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


# --- reading files ------------------------------------------------------------------------------


def builtin_dataset(name: str) -> Path:
    """A data file shipped with mlxlocal, named in a recipe as `builtin:NAME`."""
    folder = Path(__file__).resolve().parent / "datasets"
    path = folder / name
    if "/" in name or not path.is_file():
        names = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file()))
        raise MlxLocalError(f"builtin:{name}: no such built-in dataset (there are: {names})")
    return path


def data_file(spec: str | Path) -> Path:
    """The file a data path or `builtin:NAME` names."""
    if str(spec).startswith("builtin:"):
        return builtin_dataset(str(spec).removeprefix("builtin:"))
    return Path(spec).expanduser()


def check_encoding(name: str) -> str:
    """The codec's canonical name; an unknown one is refused with examples of known ones."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise MlxLocalError(
            f"unknown encoding {name!r}; use a Python codec name such as utf-8, cp1252, "
            "latin-1, utf-16 or shift_jis"
        ) from None


@dataclass
class FileFormat:
    """How a data file is written: what the reader found (or was told)."""

    kind: Literal["jsonl", "csv"]
    encoding: str  # a codec name
    bom: bool = False  # the file starts with a byte-order mark
    delimiter: str = ","  # CSV only
    named: bool = False  # the encoding was given, not found

    def describe(self) -> str:
        parts = [self.encoding + (" with BOM" if self.bom else "")]
        if self.kind == "csv":
            parts.append(
                {"\t": "tab", ",": "comma", ";": "semicolon"}[self.delimiter] + "-separated"
            )
        return ", ".join(parts)


def file_format(path: Path, encoding: str | None = None) -> FileFormat:
    """The kind, encoding (named, else UTF-8 or its byte-order mark's) and CSV delimiter."""
    kind = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "csv"}.get(path.suffix.lower())
    regular_file(path, "data file")
    if kind is None:
        raise MlxLocalError(
            f"{path}: unsupported data file; use .jsonl (one JSON object a line), .csv or .tsv"
        )
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    found = next((name for bom, name in BOMS if head.startswith(bom)), None)
    named = encoding is not None
    codec = check_encoding(encoding) if named else found or "utf-8"
    if found and named and codecs.lookup(found).name != codec and not codec.startswith("utf"):
        codec = found  # a byte-order mark is proof; a named legacy code page is a guess
    form = FileFormat(
        kind, codec, found is not None and codecs.lookup(found).name == codec, named=named
    )
    if kind == "csv":
        if path.suffix.lower() == ".tsv":
            form.delimiter = "\t"
        else:
            bom = next(b for b, name in BOMS if name == found) if form.bom else b""
            text = head[len(bom) :].decode(codec, "replace")
            form.delimiter = sniff_delimiter(
                text if len(head) < SNIFF_BYTES else text[: text.rfind("\n") + 1]
            )
    return form


def sniff_delimiter(sample: str) -> str:
    """`,` `;` or tab: csv.Sniffer limited to those, checked against the header line.

    The header names the columns and rarely holds quotes, so a delimiter it lacks (while it has
    another candidate) is a misreading of the sample; a header with none is a single column.
    """
    header = sample.split("\n", 1)[0]
    counts = {d: header.count(d) for d in DELIMITERS}
    if not any(counts.values()):
        return ","
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        sniffed = None
    if sniffed in DELIMITERS and counts[sniffed]:
        return sniffed
    return max(DELIMITERS, key=lambda d: counts[d])  # ties: the first, a comma


def iter_rows(
    path: Path, encoding: str | None = None, form: FileFormat | None = None
) -> Iterator[Row]:
    """Every record of a .jsonl or .csv/.tsv file, in order, readable or not (module notes)."""
    form = form or file_format(path, encoding)
    with open(path, "rb") as f:
        lines = _decoded(f, form)
        if form.kind == "jsonl":
            yield from _jsonl_rows(lines, path.name)
        else:
            yield from _csv_rows(lines, path.name, form.delimiter)


def read_rows(
    spec: str | Path, skip_bad: bool = False, encoding: str | None = None
) -> tuple[list[Row], list[Row]]:
    """The readable rows of a data file, and the unreadable ones skipped (`skip_bad`).

    Without `skip_bad` the first unreadable row raises, naming its file and line.
    """
    rows: list[Row] = []
    skipped: list[Row] = []
    for row in iter_rows(data_file(spec), encoding):
        if row.problem is None:
            rows.append(row)
        elif skip_bad:
            skipped.append(row)
        else:
            raise bad_line(row.where, row.problem, row.fix)
    return rows, skipped


def bad_line(where: str, problem: object, fix: str | None = None) -> MlxLocalError:
    fix = f"{fix}, or" if fix else "fix the line or"
    return MlxLocalError(f"{where}: {problem}; {fix} set data.bad_lines: skip")


@dataclass
class _Line:
    text: str
    problem: str | None = None  # why it is not text in the file's encoding
    fix: str | None = None


def _decoded(f: BinaryIO, form: FileFormat) -> Iterator[_Line]:
    """The file's lines as text, a byte-order mark dropped.

    A line that is not in the encoding is still yielded (undecodable bytes as surrogates) so
    the CSV parser keeps its place; the record holding it becomes a bad row that names the byte.
    UTF-16/32 are decoded as a stream (their newline is not the byte 0x0A): an error there
    stops the read.
    """
    codec = form.encoding
    if codec.startswith(("utf-16", "utf-32")):
        stream = io.TextIOWrapper(f, encoding=codec, newline="")
        number = 0
        try:
            for number, text in enumerate(stream, 1):  # noqa: B007
                yield _Line(text.removeprefix("\ufeff") if number == 1 else text)
        except UnicodeDecodeError as e:
            raise MlxLocalError(
                f"{f.name}:{number + 1}: not {codec} text ({e.reason}); name the file's "
                "encoding with --encoding (data.encoding in a recipe) or re-save it as UTF-8"
            ) from e
        return
    offset = 0
    for number, (raw, size) in enumerate(_bounded_lines(f), 1):
        start = offset
        offset += size
        if raw is None:
            problem = f"the line is longer than {MAX_LINE_BYTES >> 20} MiB"
            yield _Line("(too long)\n", problem, LINE_FIX)  # not blank: a row, not skipped
            continue
        if number == 1 and form.bom:
            raw = raw.removeprefix(codecs.BOM_UTF8)
            start += len(codecs.BOM_UTF8)
        try:
            yield _Line(raw.decode(codec))
        except UnicodeDecodeError as e:
            yield _Line(raw.decode(codec, "surrogateescape"), *_not_decodable(raw, e, start, form))


# A record is an example, not a corpus: a longer line is a bad row, never read whole (a 200 MB
# line would be tokenized whole, taking GBs).
MAX_LINE_BYTES = 8 << 20
LINE_FIX = "split it into examples of at most a few thousand tokens"


def _bounded_lines(f: BinaryIO) -> Iterator[tuple[bytes | None, int]]:
    """(line, its size in bytes) for each line of `f`; None past MAX_LINE_BYTES (not kept)."""
    while raw := f.readline(MAX_LINE_BYTES + 1):
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        size = len(raw)
        while rest := f.readline(1 << 20):
            size += len(rest)
            if rest.endswith(b"\n"):
                break
        yield None, size


def _not_decodable(
    raw: bytes, e: UnicodeDecodeError, start: int, form: FileFormat
) -> tuple[str, str]:
    """(problem, fix) for a line with a byte the encoding cannot read."""
    byte = raw[e.start]
    codec = "UTF-8" if form.encoding == "utf-8" else form.encoding
    problem = f"byte 0x{byte:02x} at offset {start + e.start} of the file is not {codec} text"
    if form.named:
        fix = "name the file's real encoding, or re-save it as UTF-8"
    else:
        fix = (
            "the file is in another encoding: pass --encoding cp1252 (Windows/Excel) or "
            "--encoding latin-1 (data.encoding in a recipe), or re-save it as UTF-8"
        )
    return problem, fix


def _jsonl_rows(lines: Iterable[_Line], name: str) -> Iterator[Row]:
    for number, line in enumerate(lines, 1):
        if not line.text.strip():
            continue
        if line.problem:
            yield Row(name, number, None, line.problem, line.fix)
            continue
        try:
            values = decode_json(line.text)
        except JSONProblem as e:
            yield Row(name, number, None, str(e))
            continue
        if isinstance(values, dict):
            yield Row(name, number, values)
        else:
            yield Row(name, number, None, f"expected a JSON object, got {type(values).__name__}")


def _csv_rows(lines: Iterable[_Line], name: str, delimiter: str) -> Iterator[Row]:
    bad: dict[int, _Line] = {}

    def texts() -> Iterator[str]:
        for number, line in enumerate(lines, 1):
            if line.problem:
                bad[number] = line
            yield line.text

    reader = csv.reader(texts(), delimiter=delimiter)
    header: list[str] | None = None
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            broken = next((bad[n] for n in range(line, start) if n in bad), None)
            if header is None:
                if broken:
                    raise MlxLocalError(
                        f"{name}:{line}: the header's {broken.problem}; {broken.fix}"
                    )
                header = cells
            elif broken:
                yield Row(name, line, None, broken.problem, broken.fix)
            elif len(cells) != len(header):
                problem = f"{len(cells)} cells for the header's {len(header)} columns"
                yield Row(name, line, None, problem)
            else:
                yield Row(name, line, dict(zip(header, cells, strict=True)))
    except csv.Error as e:
        raise MlxLocalError(f"{name}:{reader.line_num}: broken CSV ({e}); fix the file") from e


def field_mapping(specs: Iterable[str], allowed: Iterable[str] = FIELD_NAMES) -> dict[str, str]:
    """`NAME=COLUMN` settings (`--field prompt=question`) as a `data.fields` mapping."""
    allowed = list(allowed)
    mapping: dict[str, str] = {}
    for spec in specs:
        name, sep, column = (part.strip() for part in spec.partition("="))
        if not sep or not name or not column:
            raise MlxLocalError(
                f"--field {spec!r}: expected NAME=COLUMN, e.g. prompt=question "
                f"(names: {', '.join(allowed)})"
            )
        if name not in allowed:
            import difflib

            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean {close[0]}?" if close else f"use one of: {', '.join(allowed)}"
            raise MlxLocalError(f"--field {spec!r}: {name!r} is not a field name; {hint}")
        mapping[name] = column
    return mapping


def detect_format(row: Row, fields: dict[str, str]) -> tuple[str, str | None]:
    """The format whose fields the first row has, and why, when the row fits more than one."""
    fits = [
        fmt
        for fmt in ("preference", "chat", "completion", "instruction", "text")
        if all(fields.get(k, k) in row.values for k in REQUIRED[fmt])
    ]
    if not fits:
        keys = ", ".join(map(str, row.values)) or "none"
        raise MlxLocalError(
            f"{row.where}: cannot tell the data format from the fields ({keys}); expected "
            "messages (chat), prompt+completion, instruction+output, text or "
            "prompt+chosen+rejected (preference) — or set "
            "data.format and data.fields to map your names"
        )
    if len(fits) == 1:
        return fits[0], None

    def names(fmt: str) -> str:
        return "+".join(repr(fields.get(k, k)) for k in REQUIRED[fmt])

    others = ", ".join(f"{names(f)} ({f})" for f in fits[1:])
    return fits[0], (
        f"read as {fits[0]} data: the rows have {names(fits[0])}, which comes first, and also "
        f"{others}; set data.format (--format) to choose another"
    )


def data_format(
    rows: list[Row], data: DataSection, spec: str, note: Callable[[str], None] = lambda _: None
) -> str:
    """The format of a file's rows: data.format, or detected from the first row (an ambiguous
    detection is told to `note`)."""
    if not rows:
        raise MlxLocalError(f"{spec}: no examples; check the file")
    if data.format != "auto":
        return data.format
    fmt, why = detect_format(rows[0], data.fields)
    if why:
        note(f"{spec}: {why}")
    return fmt


# --- rows → conversations -----------------------------------------------------------------------


@dataclass
class Sample:
    """One row in a common shape: either plain text or a conversation."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None
    rejected: list[dict[str, Any]] | None = None  # preference: `messages` ends with the chosen


def parse_row(row: Row, fmt: str, data: DataSection) -> Sample:
    """One row in format `fmt` → a Sample, through `data.fields`; BadRow says what is missing."""

    def get(name: str, required: bool = True) -> Any:
        key = data.fields.get(name, name)
        value = row.values.get(key)
        if required and (value is None or value == ""):
            raise BadRow(f"no {key!r} field" if key not in row.values else f"empty {key!r}")
        return value

    if fmt == "text":
        text = get("text")
        if not isinstance(text, str):
            raise BadRow(f"{data.fields.get('text', 'text')!r} must be a string")
        return Sample(text=text)
    system = get("system", required=False) or data.system_prompt
    if fmt == "preference":
        return _preference(get, data, system)
    if fmt == "chat":
        messages = _messages(
            get("messages", required=False), data.fields.get("messages", "messages")
        )
        tools = get("tools", required=False)
        if isinstance(tools, str):
            tools = _json_cell(tools, "tools")
        if system and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return Sample(messages=messages, tools=tools or None)
    if fmt == "completion":
        user, answer = get("prompt"), get("completion")
    else:
        extra = get("input", required=False)
        user, answer = get("instruction"), get("output")
        user = f"{user}\n\n{extra}" if extra else user
    messages = [
        {"role": "user", "content": str(user)},
        {"role": "assistant", "content": str(answer)},
    ]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Sample(messages=messages)


def _preference(get: Callable[..., Any], data: DataSection, system: str | None) -> Sample:
    """prompt (text or messages) + chosen and rejected (text or assistant messages)."""

    def turns(name: str, role: str | None) -> list[dict[str, Any]]:
        value, key = get(name), data.fields.get(name, name)
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = _json_cell(value, key)  # a CSV cell holding messages as JSON
        if isinstance(value, list):
            if not value or not all(isinstance(m, dict) and "content" in m for m in value):
                raise BadRow(f"{key!r} must be text or a list of messages with 'content'")
            if role and any(m.get("role", role) != role for m in value):
                raise BadRow(f"{key!r} must hold {role} messages only")
            return [{"role": m.get("role", role), "content": str(m["content"])} for m in value]
        if isinstance(value, (dict, bool)) or value is None:
            raise BadRow(f"{key!r} must be text or a list of messages")
        return [{"role": role or "user", "content": str(value)}]

    prompt = turns("prompt", None)
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    chosen, rejected = turns("chosen", "assistant"), turns("rejected", "assistant")
    return Sample(messages=prompt + chosen, rejected=prompt + rejected)


class BadRow(Exception):
    """A row that cannot become an example: raised as MlxLocalError or skipped, per recipe."""


def _json_cell(value: str, name: str) -> Any:
    try:
        return decode_json(value)
    except JSONProblem as e:
        raise BadRow(f"{name!r} is {e}") from e


def _messages(value: Any, key: str) -> list[dict[str, Any]]:
    if isinstance(value, str):  # a CSV cell holds the list as JSON
        value = _json_cell(value, key)
    if value is None:
        raise BadRow(f"no {key!r} field")
    if not isinstance(value, list):
        raise BadRow(f"{key!r} must be a list of messages")
    if not value:
        raise BadRow("empty conversation")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRow(f"message {i + 1} has no 'role'")
        if m.get("content") is None and not m.get("tool_calls"):
            raise BadRow(f"message {i + 1} ({m['role']}) has no 'content'")
    if not any(m["role"] == "assistant" for m in value):
        raise BadRow("no assistant message to learn from")
    return value


# --- conversations → tokens and weights ---------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(
        getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None)
    )


def check_text(text: str, what: str) -> str:
    """`text`, or one MlxLocalError when it holds a lone surrogate: what Python makes of bytes
    that are not UTF-8 (surrogateescape) or of a JSON `\\ud800` escape. No tokenizer or UTF-8
    writer takes it, and each would fail with its own traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MlxLocalError(
            f"{what} is not valid text: it holds the lone surrogate U+{ord(text[e.start]):04X} "
            f"at offset {e.start} (undecoded bytes, or a \\u escape of half a character); "
            "give it as UTF-8 text"
        ) from None
    return text


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], **options) -> Any:
    """`tokenizer.apply_chat_template`, where whatever the template raises is one MlxLocalError.

    A template is the checkpoint's code: besides jinja's TemplateError (`raise_exception`) it
    can divide by zero, recurse without end or hit the sandbox's range limit.
    """
    for i, message in enumerate(messages, 1):
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            check_text(message["content"], f"message {i}'s content")
    try:
        return tokenizer.apply_chat_template(messages, **options)
    except Exception as e:
        problem = " ".join(str(e).split())[:300]
        raise MlxLocalError(
            f"the model's chat template fails on this conversation ({type(e).__name__}: "
            f"{problem}); change the messages, or fix chat_template in tokenizer_config.json"
        ) from e


def _chat_ids(tokenizer, renderings: list[tuple[list, bool]], tools) -> list[list[int]]:
    """Token ids of (messages, add_generation_prompt) renderings, tokenized in one batch.

    The same ids as apply_chat_template(tokenize=True), which renders and then tokenizes
    without adding special tokens; batching lets the fast tokenizer use every core.
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    texts = [
        apply_chat_template(tokenizer, m, tools=tools, add_generation_prompt=g, tokenize=False)
        if m or g
        else ""
        for m, g in renderings
    ]
    hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    return [list(ids) for ids in hf(texts, add_special_tokens=False)["input_ids"]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def render_chat(tokenizer, messages, tools=None, train_on_prompt=False) -> Example:
    """Tokens of a conversation with weight 1 on every assistant turn (its answer and end).

    Turn i spans from where the conversation before it, plus the generation prompt (the
    assistant header), stops matching the full rendering, to where the conversation through
    it does; matching token ids, not text, keeps this right whatever the template's markup.
    """
    turns = (
        [] if train_on_prompt else [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    )
    # (messages kept, generation prompt) of each rendering; a last assistant turn's "through" is
    # the whole conversation, so each distinct rendering is tokenized once.
    full = (len(messages), False)
    keys = [full]
    for i in turns:
        keys += [(i, False), (i, True), (i + 1, False)]
    unique = list(dict.fromkeys(keys))
    try:
        ids = _chat_ids(tokenizer, [(messages[:n], g) for n, g in unique], tools)
    except MlxLocalError as e:
        raise BadRow(str(e)) from e
    except Exception as e:  # the tokenizer refusing the rendered text
        raise BadRow(f"cannot tokenize this conversation ({e})") from e
    rendered = dict(zip(unique, ids, strict=True))
    tokens = rendered[full]
    weights = [1 if train_on_prompt else 0] * len(tokens)
    for i in turns:
        before, prompted, through = (rendered[k] for k in ((i, False), (i, True), (i + 1, False)))
        start = _answer_start(before, prompted, tokens)
        end = _common_prefix(through, tokens)
        weights[start:end] = [1] * (end - start)
    return Example(tokens, weights)


_DROPS_SYSTEM: dict[int, tuple[Any, bool]] = {}  # id(tokenizer) → (tokenizer, verdict)
SYSTEM_MERGED = (
    "system prompts merged into the first user turn (the chat template refuses or drops them)"
)


def drops_system(tokenizer) -> bool:
    """Whether the chat template refuses a system message (Gemma 2 raises) or renders a
    conversation that ends with an answer without it (Mistral v0.3 keeps it only when a user
    turn comes last), while it takes the same conversation without one; asked once per
    tokenizer."""
    known = _DROPS_SYSTEM.get(id(tokenizer))
    if known is not None and known[0] is tokenizer:
        return known[1]
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    probe = "mlxlocal-system-probe"
    try:
        tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:
        verdict = False  # a template that fails either way: render_chat says how
    else:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "system", "content": probe}, *turns], tokenize=False
            )
            verdict = probe not in text
        except Exception:
            verdict = True
    _DROPS_SYSTEM[id(tokenizer)] = (tokenizer, verdict)
    return verdict


def merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A leading system message folded into the first user turn (system, blank line, user), as
    models without a system role are prompted."""
    system, rest = messages[0], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": f"{system['content']}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system["content"]}, *rest]


def _answer_start(before: list[int], prompted: list[int], full: list[int]) -> int:
    """Where the answer begins in `full`, given the ids before it without and with the header."""
    header = prompted[_common_prefix(before, prompted) :]
    # A template may close the conversation after the last message (e.g. with an EOS) before
    # the generation prompt; the full rendering has the header right where the prefix ends.
    at = _common_prefix(before, full)
    if full[at : at + len(header)] == header:
        return at + len(header)
    return _common_prefix(prompted, full)


def _text_ids(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer.encode(text))
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_sample(sample: Sample, tokenizer, chat: bool, train_on_prompt: bool) -> Example:
    """Token ids and loss weights; shared with evaluation, so both see the same rendering."""
    texts = [sample.text] if sample.text is not None else [m["content"] for m in sample.messages]
    try:
        for text in texts:
            if isinstance(text, str):
                check_text(text, "the text")
    except MlxLocalError as e:
        raise BadRow(str(e)) from e
    if sample.text is not None:
        tokens = _text_ids(tokenizer, sample.text)
        return Example(tokens, [1] * len(tokens))
    if chat:
        messages = sample.messages
        if messages[0]["role"] == "system" and drops_system(tokenizer):
            messages = merge_system(messages)
        return render_chat(tokenizer, messages, sample.tools, train_on_prompt)
    # No chat template: prompt + completion verbatim (a system prompt first, on its own).
    *head, answer = [m["content"] for m in sample.messages]
    if len(head) == 2:
        head = [f"{head[0]}\n\n{head[1]}"]
    prompt = list(tokenizer.encode(head[0]))
    tokens = _text_ids(tokenizer, head[0] + answer)
    start = _common_prefix(prompt, tokens)
    return Example(tokens, [1 if train_on_prompt or i >= start else 0 for i in range(len(tokens))])


# --- the whole file -----------------------------------------------------------------------------


def skip_or_raise(
    data: DataSection, where: str, problem: object, skip: Callable[[str, str], None]
) -> None:
    """A bad row: raised as an MlxLocalError, or with data.bad_lines: skip, passed to `skip`."""
    if data.bad_lines != "skip":
        raise bad_line(where, problem)
    skip(where, str(problem))


def parse_rows(
    rows: Iterable[Row], fmt: str, data: DataSection, skip: Callable[[str, str], None]
) -> Iterator[tuple[Row, Sample]]:
    """Each row with its Sample; a row that is none stops the read or goes to `skip`."""
    for row in rows:
        try:
            sample = parse_row(row, fmt, data)
        except BadRow as e:
            skip_or_raise(data, row.where, e, skip)
            continue
        yield row, sample


def load_examples(
    data: DataSection, tokenizer, split: str = "train", note: Callable[[str], None] = lambda _: None
) -> tuple[list[Example], DataReport]:
    """Examples of one split of a recipe's data section, and what happened on the way (`note`
    hears how an ambiguous format was decided)."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', not {split!r}")
    spec = data.valid if split == "valid" and data.valid is not None else data.train
    report = DataReport(file=spec)
    if split == "valid" and data.valid is None and data.valid_fraction is None:
        return [], report

    def skip(where: str, problem: str) -> None:
        report.bad_lines += 1
        report.note(where, problem)

    rows, unreadable = read_rows(spec, data.bad_lines == "skip", data.encoding)
    for row in unreadable:
        skip(row.where, row.problem)
    if data.valid_fraction is not None:
        rows = _held_out(rows, data.valid_fraction, spec, keep=split == "valid")
    report.format = data_format(rows, data, spec, note)
    chat = has_chat_template(tokenizer)
    if report.format in ("chat", "instruction") and not chat:
        raise MlxLocalError(
            f"{spec}: {report.format} data needs the model's chat template, and its tokenizer "
            "has none; use a model with a chat template, or text / prompt-completion data"
        )
    examples: list = []
    for row, sample in parse_rows(rows, report.format, data, skip):
        if chat and sample.messages and sample.messages[0]["role"] == "system":
            report.system_merged = report.system_merged or drops_system(tokenizer)
        try:
            on_prompt = data.train_on_prompt and sample.rejected is None
            example = tokenize_sample(sample, tokenizer, chat, on_prompt)
            if sample.rejected is not None:
                rejected = Sample(messages=sample.rejected)
                pair = Pair(example, tokenize_sample(rejected, tokenizer, chat, False))
        except BadRow as e:
            skip_or_raise(data, row.where, e, skip)
            continue
        if sample.rejected is not None:
            if sample.messages == sample.rejected:
                report.identical += 1
                report.note(row.where, "dropped: chosen and rejected are the same answer")
                continue
            sides = [_fit(e, data, report, row.where) for e in (pair.chosen, pair.rejected)]
            if None in sides:
                report.dropped -= sides.count(None) - 1  # one pair, counted once
                continue
            example = Pair(*sides)
            parts = sides
        else:
            example = _fit(example, data, report, row.where)
            parts = [example] if example is not None else []
        if example is not None:
            examples.append(example)
            report.tokens += sum(len(e.tokens) for e in parts)
            report.trained_tokens += sum(sum(e.weights[1:]) for e in parts)
    report.examples = len(examples)
    if not examples:
        raise MlxLocalError(
            f"{spec}: every example was dropped; see data.max_length and data.too_long"
        )
    return examples, report


def _fit(example: Example, data: DataSection, report: DataReport, where: str) -> Example | None:
    """Apply data.max_length: truncate or drop, and drop what leaves nothing to learn."""
    n, limit = len(example.tokens), data.max_length
    if n > limit and data.too_long == "drop":
        report.dropped += 1
        report.note(where, f"dropped: {n} tokens > max_length {limit}")
        return None
    if not any(example.weights[1:limit]):
        report.dropped += 1
        report.note(where, f"dropped: nothing to learn within max_length {limit}")
        return None
    if n > limit:
        report.truncated += 1
        report.note(where, f"truncated from {n} to {limit} tokens")
        return Example(example.tokens[:limit], example.weights[:limit])
    return example


def _held_out(rows: list[Row], fraction: float, spec: str, keep: bool) -> list[Row]:
    """A fixed random fraction of the rows (the same whatever the training seed)."""
    if len(rows) < 2:
        raise MlxLocalError(f"{spec}: too few examples to hold out data.valid_fraction")
    count = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    chosen = set(np.random.default_rng(0).permutation(len(rows))[:count].tolist())
    return [row for i, row in enumerate(rows) if (i in chosen) == keep]


def describe_dataset(
    data: DataSection, spec: str, note: Callable[[str], None] = lambda _: None
) -> str:
    """Read and check every row of a data file without a tokenizer (for `recipes validate`)."""
    skipped: list[str] = []
    rows, unreadable = read_rows(spec, data.bad_lines == "skip", data.encoding)
    fmt = data_format(rows, data, spec, note)
    good = sum(1 for _ in parse_rows(rows, fmt, data, lambda where, _: skipped.append(where)))
    skip = len(skipped) + len(unreadable)
    return f"{spec}: {good:,} examples ({fmt})" + (f", {skip} bad lines skipped" if skip else "")


# --- examples → arrays --------------------------------------------------------------------------


@dataclass
class Batch:
    tokens: mx.array  # (B, L) int32, padded with 0
    weights: mx.array  # (B, L) float32, 1 where tokens[b, t] is a target
    segments: mx.array  # (B, L) int32, 1..k numbering the examples in a row; 0 = padding


@dataclass
class PairBatch(Batch):
    """Pairs as rows: every chosen answer, then every rejected one in the same order."""

    index: np.ndarray  # (B,) the pairs' positions in their list (for cached reference values)
    reference: mx.array | None = None  # (2B,) the reference model's scores of the rows


def collate_pairs(pairs: list[Pair], index: list[int], max_length: int) -> PairBatch:
    b = collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], max_length)
    return PairBatch(b.tokens, b.weights, b.segments, np.asarray(index))


def collate(rows: list[list[Example]], max_length: int) -> Batch:
    """Rows of examples → padded arrays; the first token of every example is not a target.

    Training packs several examples in a row; evaluation puts one in each.
    """
    longest = max(sum(len(e.tokens) for e in row) for row in rows)
    width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max(max_length, longest))
    tokens = np.zeros((len(rows), width), np.int32)
    weights = np.zeros((len(rows), width), np.float32)
    segments = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        pos = 0
        for k, example in enumerate(row, 1):
            end = pos + len(example.tokens)
            tokens[b, pos:end] = example.tokens
            weights[b, pos:end] = example.weights
            weights[b, pos] = 0
            segments[b, pos:end] = k
            pos = end
    return Batch(mx.array(tokens), mx.array(weights), mx.array(segments))
