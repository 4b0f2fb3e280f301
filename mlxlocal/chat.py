"""`chat`: a conversation whose KV cache lives across turns, and the REPL around it.

Each turn renders the whole conversation in the chat template, keeps the cached tokens it shares
with that rendering, and feeds only the rest, so a long history is never processed twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from .checkpoint.atomic import atomic_file
from .constraints import from_options
from .errors import MlxLocalError
from .generate import (
    LoadedModel,
    Sampling,
    Stream,
    check_constraint,
    fit_context,
    render_chat,
)

HELP = "commands: /reset  /system TEXT  /save FILE [--force]  /quit  (Ctrl-C stops an answer)"


class ChatSession:
    """A conversation with one model; `send` streams the answer to a new user message."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        system: str | None = None,
        max_tokens: int = 512,
        sampling: Sampling | None = None,
        stop: Iterable[str] = (),
        choices: list[str] | str | None = None,
        regex: str | None = None,
        json_schema: dict | str | Path | None = None,
        json_object: bool = False,
    ):
        """The constraint options (see `generate.stream`) shape every answer."""
        self.constraint = from_options(choices, regex, json_schema, json_object)
        check_constraint(self.constraint is not None, list(stop), ignore_eos=False)
        if not lm.tokenizer.has_chat_template:
            raise MlxLocalError(
                f"{lm.path}: the tokenizer has no chat template, so it cannot hold a "
                "conversation; use `mlxlocal generate` instead"
            )
        self.lm, self.max_tokens, self.stop = lm, max_tokens, list(stop)
        self.sampling = sampling or Sampling()
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        from mlx_lm.models.cache import make_prompt_cache

        self.turns: list[dict[str, str]] = []
        self._cache = make_prompt_cache(self.lm.model)
        self._cached: list[int] = []  # the tokens the cache holds, in order
        self._answer: Stream | None = None
        self._answer_prompt: list[int] = []

    def set_system(self, text: str | None) -> None:
        """Change the system prompt; the history stays, the cache is reused up to the change."""
        self._settle()
        self.system = text or None

    @property
    def messages(self) -> list[dict[str, str]]:
        self._settle()
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def send(self, text: str) -> Stream:
        """Add a user message; iterate the returned stream for the answer as it is produced."""
        self._settle()
        self.turns.append({"role": "user", "content": text})
        try:
            ids = render_chat(self.lm.tokenizer, self.messages)
            ids, max_tokens, _ = fit_context(ids, self.max_tokens, self.lm.context)
        except MlxLocalError:
            self.turns.pop()
            raise
        # Reuse the cache up to where it stops matching; at least one new token must be fed.
        keep = min(_common_prefix(self._cached, ids), len(ids) - 1)
        self._rewind(keep)
        self._answer_prompt = ids
        self._answer = Stream(
            self.lm,
            ids[keep:],
            max_tokens=max_tokens,
            sampling=self.sampling,
            stop=self.stop,
            cache=self._cache,
            constraint=self.constraint,
        )
        return self._answer

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the conversation as JSON ({"messages": [...]}) atomically; an existing file
        is replaced only with `force`."""
        path = Path(path)
        if path.is_file() and not force:
            raise MlxLocalError(
                f"{path} already exists: `/save {path} --force` replaces it, or choose another name"
            )
        with atomic_file(path, force=force) as tmp:
            tmp.write_text(json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False))
        return path

    def _settle(self) -> None:
        """Take in the last answer, however it ended (finished, abandoned, interrupted)."""
        if self._answer is None:
            return
        answer, self._answer = self._answer, None
        self.turns.append({"role": "assistant", "content": answer.text})
        # The cache holds the prompt and every token produced, unless Ctrl-C landed inside the
        # model and left some layers a step ahead or behind: `_rewind` cuts them to a common
        # length, and a cache that cannot be cut is started afresh.
        self._cached = self._answer_prompt + answer.tokens
        interrupted = answer.result is None
        self._rewind(len(self._cached), must_check=interrupted)

    def _rewind(self, n: int, must_check: bool = False) -> None:
        """Make the cache hold exactly the first `n` cached tokens (or start it afresh)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        if can_trim_prompt_cache(self._cache) and all(hasattr(c, "offset") for c in self._cache):
            n = min([n] + [c.offset for c in self._cache])
            for c in self._cache:
                c.trim(c.offset - n)
            self._cached = self._cached[:n]
        elif must_check or n < len(self._cached):
            self._cache, self._cached = make_prompt_cache(self.lm.model), []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def repl(
    session: ChatSession,
    read: Callable[[], str],
    write: Callable[[str], None],
    note: Callable[[str], None],
) -> None:
    """Answer messages until `/quit` or end of input; `read` raises EOFError at the end, and
    MlxLocalError for a line it cannot read (not UTF-8): that line is skipped with a note.

    Ctrl-C while answering stops that answer; at the prompt it only clears the line.
    """
    while True:
        try:
            line = read().strip()
        except EOFError:
            return
        except KeyboardInterrupt:
            note("\n(/quit or Ctrl-D to leave)")
            continue
        except MlxLocalError as e:
            note(f"error: {e}")
            continue
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            note("(conversation cleared)")
        elif command == "/system":
            session.set_system(arg.strip())
            note(f"(system prompt {'set' if arg.strip() else 'removed'})")
        elif command == "/save":
            _save(session, arg.strip(), note)
        elif command.startswith("/") and command != "/":
            note(f"unknown command {command}; {HELP}")
        else:
            _answer(session, line, write, note)


def _save(session: ChatSession, arg: str, note: Callable[[str], None]) -> None:
    """`/save FILE [--force]`; a failure is one note and the conversation goes on."""
    head, _, last = arg.rpartition(" ")
    path, force = (head.strip(), True) if last == "--force" else (arg, False)
    if not path:
        note("usage: /save FILE [--force]")
        return
    try:
        saved = session.save(path, force=force)
    except (MlxLocalError, OSError) as e:
        note(f"error: {e}")
        return
    note(f"(saved to {saved})")


def _answer(session: ChatSession, line: str, write, note) -> None:
    try:
        for piece in session.send(line):
            write(piece)
        write("\n")
    except KeyboardInterrupt:
        write("\n")
        note("(stopped)")
    except MlxLocalError as e:
        note(f"error: {e}")
