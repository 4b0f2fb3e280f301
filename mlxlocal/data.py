"""The one data layer: JSONL/CSV rows → samples → token ids with loss weights.

Training, evaluation, `batch` and `recipes validate` all read files here, so a file reads the
same everywhere:
- `.jsonl`: one JSON object a line, blank lines skipped; `.csv`: comma-separated with a header
  row, quoted cells may hold commas and newlines, blank lines skipped.
- UTF-8, with or without a byte-order mark (as Excel saves "CSV UTF-8"); LF or CRLF line ends.
- A record that cannot be read (not JSON, not an object, a CSV row with more or fewer cells than
  the header, not UTF-8) is a bad row named by `file:line` (the line it starts on); the caller
  stops on it or skips it (`data.bad_lines`, `batch --on-error`). A CSV the parser gives up on
  stops the read.

Four formats: plain `text`, `prompt`/`completion`, chat `messages` (OpenAI style, `tools`
allowed) and `instruction`/`input`/`output`. Conversations are rendered with the model's chat
template; the loss covers every assistant turn, found by rendering each turn's prefix and
diffing token ids, so it works for any template without knowing its markup.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint.inputs import JSONProblem, decode_json, regular_file
from .errors import MlxLocalError

__all__ = [
    "BadRow",
    "Batch",
    "DataReport",
    "DataSection",
    "Example",
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
}
NOTES_KEPT = 20
PAD_MULTIPLE = 8  # batch lengths are rounded up to this, so few shapes are compiled
NOT_UTF8 = "not UTF-8 text; re-save the file as UTF-8"

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
]


class DataSection(BaseModel):
    """A recipe's `data` section: the files and how their rows become examples.

    Defined here, not in recipe.py, so that this layer can take it typed while recipe.py
    (which validates recipes against these files) imports this one.
    """

    model_config = ConfigDict(extra="forbid")

    train: str = Field(min_length=1)
    valid: str | None = None
    valid_fraction: float | None = Field(None, gt=0, lt=1)
    format: Literal["auto", "text", "completion", "chat", "instruction"] = "auto"
    fields: dict[FieldName, str] = {}
    system_prompt: str | None = None
    train_on_prompt: bool = False
    max_length: int = Field(2048, ge=2)
    too_long: Literal["truncate", "drop"] = "truncate"
    packing: bool = True
    bad_lines: Literal["error", "skip"] = "error"


@dataclass
class Example:
    tokens: list[int]
    weights: list[int]  # 1 where tokens[i] is a token the loss should predict


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
    notes: list[str] = field(default_factory=list)  # "file:line: what happened", first few

    def note(self, where: str, what: str) -> None:
        if len(self.notes) < NOTES_KEPT:
            self.notes.append(f"{where}: {what}")

    def summary(self) -> str:
        parts = [
            f"{self.examples:,} examples ({self.format})",
            f"{self.tokens:,} tokens, {self.trained_tokens:,} trained",
        ]
        for name in ("truncated", "dropped", "bad_lines"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name):,} {name.replace('_', ' ')}")
        return f"{self.file}: " + ", ".join(parts)


@dataclass
class Row:
    """One record of a data file, or why it could not be read."""

    file: str  # the file's name, for messages
    line: int  # where the record starts, 1-based
    values: dict[str, Any] | None  # None when the record could not be read
    problem: str | None = None

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


def iter_rows(path: Path) -> Iterator[Row]:
    """Every record of a .jsonl or .csv file, in order, readable or not (see the module notes)."""
    records = {".jsonl": _jsonl_rows, ".csv": _csv_rows}.get(path.suffix.lower())
    regular_file(path, "data file")
    if records is None:
        raise MlxLocalError(
            f"{path}: unsupported data file; use .jsonl (one JSON object a line) or .csv"
        )
    with open(path, "rb") as f:
        yield from records(f, path.name)


def read_rows(spec: str | Path, skip_bad: bool = False) -> tuple[list[Row], list[Row]]:
    """The readable rows of a data file, and the unreadable ones skipped (`skip_bad`).

    Without `skip_bad` the first unreadable row raises, naming its file and line.
    """
    rows: list[Row] = []
    skipped: list[Row] = []
    for row in iter_rows(data_file(spec)):
        if row.problem is None:
            rows.append(row)
        elif skip_bad:
            skipped.append(row)
        else:
            raise bad_line(row.where, row.problem)
    return rows, skipped


def bad_line(where: str, problem: object) -> MlxLocalError:
    return MlxLocalError(f"{where}: {problem}; fix the line or set data.bad_lines: skip")


def _decoded(f: BinaryIO, bad: set[int]) -> Iterator[str]:
    """The file's lines as text, a leading BOM dropped; lines that are not UTF-8 go into `bad`.

    Such a line is still yielded (undecodable bytes as surrogates) so the CSV parser keeps its
    place; the record holding it becomes a bad row.
    """
    for number, raw in enumerate(f, 1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(number)
            yield raw.decode("utf-8", "surrogateescape")


def _jsonl_rows(f: BinaryIO, name: str) -> Iterator[Row]:
    bad: set[int] = set()
    for number, line in enumerate(_decoded(f, bad), 1):
        if not line.strip():
            continue
        if number in bad:
            yield Row(name, number, None, NOT_UTF8)
            continue
        try:
            values = decode_json(line)
        except JSONProblem as e:
            yield Row(name, number, None, str(e))
            continue
        if isinstance(values, dict):
            yield Row(name, number, values)
        else:
            yield Row(name, number, None, f"expected a JSON object, got {type(values).__name__}")


def _csv_rows(f: BinaryIO, name: str) -> Iterator[Row]:
    bad: set[int] = set()
    reader = csv.reader(_decoded(f, bad))
    header: list[str] | None = None
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            if header is None:
                if bad:
                    raise MlxLocalError(f"{name}:{line}: the header is {NOT_UTF8}")
                header = cells
            elif not bad.isdisjoint(range(line, start)):
                yield Row(name, line, None, NOT_UTF8)
            elif len(cells) != len(header):
                problem = f"{len(cells)} cells for the header's {len(header)} columns"
                yield Row(name, line, None, problem)
            else:
                yield Row(name, line, dict(zip(header, cells, strict=True)))
    except csv.Error as e:
        raise MlxLocalError(f"{name}:{reader.line_num}: broken CSV ({e}); fix the file") from e


def detect_format(row: Row, fields: dict[str, str]) -> str:
    """The format whose fields the first row has."""
    for fmt in ("chat", "completion", "instruction", "text"):
        if all(fields.get(k, k) in row.values for k in REQUIRED[fmt]):
            return fmt
    keys = ", ".join(map(str, row.values)) or "none"
    raise MlxLocalError(
        f"{row.where}: cannot tell the data format from the fields ({keys}); expected messages "
        "(chat), prompt+completion, instruction+output or text — or set data.format and "
        "data.fields to map your names"
    )


def data_format(rows: list[Row], data: DataSection, spec: str) -> str:
    """The format of a file's rows: data.format, or detected from the first row."""
    if not rows:
        raise MlxLocalError(f"{spec}: no examples; check the file")
    return data.format if data.format != "auto" else detect_format(rows[0], data.fields)


# --- rows → conversations -----------------------------------------------------------------------


@dataclass
class Sample:
    """One row in a common shape: either plain text or a conversation."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None


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
        return render_chat(tokenizer, sample.messages, sample.tools, train_on_prompt)
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
    data: DataSection, tokenizer, split: str = "train"
) -> tuple[list[Example], DataReport]:
    """Examples of one split of a recipe's data section, and what happened on the way."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', not {split!r}")
    spec = data.valid if split == "valid" and data.valid is not None else data.train
    report = DataReport(file=spec)
    if split == "valid" and data.valid is None and data.valid_fraction is None:
        return [], report

    def skip(where: str, problem: str) -> None:
        report.bad_lines += 1
        report.note(where, problem)

    rows, unreadable = read_rows(spec, data.bad_lines == "skip")
    for row in unreadable:
        skip(row.where, row.problem)
    if data.valid_fraction is not None:
        rows = _held_out(rows, data.valid_fraction, spec, keep=split == "valid")
    report.format = data_format(rows, data, spec)
    chat = has_chat_template(tokenizer)
    if report.format in ("chat", "instruction") and not chat:
        raise MlxLocalError(
            f"{spec}: {report.format} data needs the model's chat template, and its tokenizer "
            "has none; use a model with a chat template, or text / prompt-completion data"
        )
    examples = []
    for row, sample in parse_rows(rows, report.format, data, skip):
        try:
            example = tokenize_sample(sample, tokenizer, chat, data.train_on_prompt)
        except BadRow as e:
            skip_or_raise(data, row.where, e, skip)
            continue
        example = _fit(example, data, report, row.where)
        if example is not None:
            examples.append(example)
            report.tokens += len(example.tokens)
            report.trained_tokens += sum(example.weights[1:])
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


def describe_dataset(data: DataSection, spec: str) -> str:
    """Read and check every row of a data file without a tokenizer (for `recipes validate`)."""
    skipped: list[str] = []
    rows, unreadable = read_rows(spec, data.bad_lines == "skip")
    fmt = data_format(rows, data, spec)
    good = sum(1 for _ in parse_rows(rows, fmt, data, lambda where, _: skipped.append(where)))
    skip = len(skipped) + len(unreadable)
    return f"{spec}: {good:,} examples ({fmt})" + (f", {skip} bad lines skipped" if skip else "")


# --- examples → arrays --------------------------------------------------------------------------


@dataclass
class Batch:
    tokens: mx.array  # (B, L) int32, padded with 0
    weights: mx.array  # (B, L) float32, 1 where tokens[b, t] is a target
    segments: mx.array  # (B, L) int32, 1..k numbering the examples in a row; 0 = padding


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
