"""The serving loop: one thread owns the model and its decode batches (`batching.DecodeBatch`);
requests join and leave between decode steps (continuous batching).

Each model id (the base, and each adapter over it) has its own batch, since one forward pass
runs one set of weights: sequences for the same id share a batch, and every step advances each
id's batch in turn. A bounded number of requests run at once (`max_concurrency`); a bounded number
more wait (`queue`); past that `submit` refuses (the HTTP layer answers 429). A cancelled request
(a client that went away) leaves its batch at the next step and frees its slot.

With a prefix cache, each finished sequence's KV cache is kept (mlx-lm's `LRUPromptCache`, keyed
by model id, bounded in bytes and to twice `max_concurrency` entries, least recently used out
first) and a new prompt starts from the longest stored prefix it shares: a chat client resending
its whole conversation each turn has only the new turn processed.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..constraints import ConstrainedAnswer
from ..errors import MlxLocalError
from ..generate import Answer, LoadedModel, Sampling
from .batching import DecodeBatch

log = logging.getLogger("mlxlocal.serve")


class Busy(MlxLocalError):
    """Every slot and every queue place is taken: try again shortly."""


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one step produced for one request; `finish_reason` or `error` set on the last."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Job:
    """One request's sequence: what to generate, and where its events go (`deliver` is called
    from the engine's thread and must be thread-safe)."""

    model: str
    ids: list[int]
    max_tokens: int
    deliver: Callable[[Event], None]
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    top_logprobs: int | None = None  # None: no log-probabilities; k: the chosen one and top k
    logits_processors: list = field(default_factory=list)
    # Under a response_format: the answer's matcher (`LoadedModel.constrained`); it masks the
    # logits and ends the answer once complete.
    constrained: ConstrainedAnswer | None = None
    # The whole answer in one event at its end (a client that does not stream): no wake-up of
    # the HTTP side per token.
    whole: bool = False
    # Set by the engine.
    uid: int | None = None
    done: bool = False
    answer: Answer | None = None
    held: Event = field(default_factory=Event)  # a whole answer so far


class Engine:
    """The loop thread and its queue. `variants` maps a model id to a model (the base, or an
    adapted copy sharing its weights: `adapters.layers.adapted_copy`)."""

    def __init__(
        self,
        lm: LoadedModel,
        variants: dict[str, Any],
        *,
        max_concurrency: int = 16,
        queue: int = 64,
        prefill_step_size: int = 2048,
        prefix_cache: int | None = None,
    ):
        if max_concurrency < 1 or queue < 0:
            raise MlxLocalError("max_concurrency must be ≥ 1 and queue ≥ 0")
        self.lm, self.variants = lm, variants
        self.max_concurrency, self.queue = max_concurrency, queue
        self.prefill_step_size = prefill_step_size
        self.prefix_cache_bytes = prefix_cache
        self.reused_tokens = 0  # prompt tokens taken from the prefix cache, in all
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancelled: list[Job] = []
        self._load = 0  # accepted and not finished: running + waiting
        self._stopping = False
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="mlxlocal-serve", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def load(self) -> int:
        return self._load

    @property
    def kept_bytes(self) -> int:
        """Bytes of KV caches the prefix cache holds."""
        prefixes = getattr(self, "_prefixes", None)
        return prefixes.nbytes if prefixes is not None else 0

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise Busy when max_concurrency + queue requests are in already."""
        if job.model not in self.variants:
            raise MlxLocalError(f"no model {job.model!r}")
        with self._cv:
            if self._stopping:
                raise MlxLocalError("the server is shutting down")
            if not self.alive:
                raise MlxLocalError(f"the generation loop stopped ({self.failure})")
            if self._load >= self.max_concurrency + self.queue:
                raise Busy(
                    f"the server is at capacity ({self.max_concurrency} running, {self.queue} "
                    "waiting): retry shortly"
                )
            self._load += 1
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job` (its client went away): it leaves the batch at the next step."""
        with self._cv:
            if job.done:
                return
            if job in self._waiting:
                self._waiting.remove(job)
                self._release(job)
            else:
                self._cancelled.append(job)
                self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def _release(self, job: Job) -> None:
        """Called with the lock held: the job's slot is free."""
        if not job.done:
            job.done = True
            self._load -= 1

    def _finish(self, job: Job) -> None:
        with self._cv:  # re-entrant (a Condition's lock is an RLock)
            self._release(job)

    # --- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - reported by /health, never silently
            log.exception("the generation loop stopped")
            self.failure = f"{type(e).__name__}: {e}"
            with self._cv:
                running = list(getattr(self, "_running", {}).values())
                for job in [*self._waiting, *running]:
                    self._fail(job, f"the generation loop stopped ({self.failure})")
                self._waiting.clear()

    def _fail(self, job: Job, message: str) -> None:
        _deliver(job, Event(error=message))
        self._finish(job)

    def _loop(self) -> None:
        import mlx.core as mx
        from mlx_lm.utils import maybe_set_recommended_wired_limit

        self._mx = mx
        # Ids the tokenizer cannot decode are masked inside the samplers, not by a logits
        # processor: any processor sends the batch down its one-sequence-at-a-time path.
        self._mask = self.lm.decodable_only
        self._greedy = self.lm.batch_sampler(Sampling(temp=0.0))
        self._gens: dict[str, DecodeBatch] = {}
        # As mlx-lm's generators do: on a Mac, keep the model's memory wired while serving.
        wired = maybe_set_recommended_wired_limit()
        self._running: dict[tuple[str, int], Job] = {}
        self._prefixes = None
        if self.prefix_cache_bytes:
            from mlx_lm.models.cache import LRUPromptCache

            # Bounded in entries as well as bytes: each lookup walks every stored prompt that
            # shares the new one's first tokens (a chat template's header is shared by all),
            # ~0.08 ms an entry on the loop thread, where the model waits for it.
            self._prefixes = LRUPromptCache(
                max_size=2 * self.max_concurrency, max_bytes=self.prefix_cache_bytes
            )
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._cancelled or self._running):
                    self._cv.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, []
                fresh = []
                while self._waiting and len(self._running) + len(fresh) < self.max_concurrency:
                    fresh.append(self._waiting.popleft())
            for job in cancelled:
                self._remove(job)
            for job in fresh:
                self._start(job)
            for name in {m for m, _ in self._running}:
                self._step(name)
        for job in list(self._running.values()):
            self._remove(job)
            _deliver(job, Event(error="the server is shutting down"))
        if wired is not None:
            mx.synchronize()
            mx.set_wired_limit(wired)

    def _generator(self, name: str) -> DecodeBatch:
        if name not in self._gens:
            self._gens[name] = DecodeBatch(
                self.variants[name],
                self.lm.stop_ids,
                self._greedy,
                max_rows=self.max_concurrency,
                prefill_rows=min(self.max_concurrency, 8),
                prefill_step=self.prefill_step_size,
            )
        return self._gens[name]

    def _start(self, job: Job) -> None:
        try:
            gen = self._generator(job.model)
            # Only a constrained job gets its mask as a processor; a batch whose sequences have
            # none stays on the batched path (a mixed one runs the processors per row).
            processors = job.sampling.logits_processors() + job.logits_processors
            if job.constrained is not None:
                processors.append(job.constrained.processor())
            cache, rest = None, job.ids
            if self._prefixes is not None:
                cache, rest = self._reuse(job)
            job.uid = gen.insert(
                rest,
                job.max_tokens,
                cache=cache,
                all_tokens=job.ids[: len(job.ids) - len(rest)],
                sampler=self._sampler(job.sampling),
                logits_processors=processors,
                logprobs=job.top_logprobs is not None,
            )
        except Exception as e:  # noqa: BLE001 - one request fails, the loop goes on
            log.exception("could not start a request")
            self._fail(job, f"could not start generating ({type(e).__name__}: {e})")
            return
        job.answer = Answer(self.lm.tokenizer, job.stop, constrained=job.constrained)
        self._running[(job.model, job.uid)] = job

    def _sampler(self, sampling: Sampling):
        """The greedy sampler shared by every greedy request (one batched argmax), else the
        request's own; with a seed, its draws depend on the seed alone, not on its neighbours."""
        if sampling.temp == 0:
            return self._greedy
        sample = self.lm.batch_sampler(sampling)
        if sampling.seed is None:
            return sample
        mx, steps, seed = self._mx, itertools.count(), sampling.seed

        def seeded(logprobs):
            mx.random.seed((seed + next(steps) * 0x9E3779B97F4A7C15) % 2**64)
            return sample(logprobs)

        return seeded

    def _remove(self, job: Job) -> None:
        """Take a running job out of its batch (cancelled, or ended on a stop string)."""
        if self._running.pop((job.model, job.uid), None) is not None:
            try:
                kept = self._gens[job.model].remove(job.uid, keep_cache=self._prefixes is not None)
                if kept is not None:
                    cache, tokens = kept
                    self._keep_prefix(job.model, tokens, cache)
            except Exception:  # noqa: BLE001
                log.exception("could not remove a sequence; its batch starts afresh")
                self._drop(job.model, "the batch this request was in failed")
        self._finish(job)

    def _drop(self, name: str, message: str) -> None:
        """Fail every request of `name`'s batch and start that batch afresh."""
        self._gens.pop(name, None)
        for key in [k for k in self._running if k[0] == name]:
            self._fail(self._running.pop(key), message)

    def _step(self, name: str) -> None:
        try:
            responses = self._gens[name].next()
        except Exception as e:  # noqa: BLE001 - the batch fails, the server goes on
            log.exception("a generation step failed")
            self._drop(name, f"generation failed ({type(e).__name__}: {e})")
            return
        for r in responses:
            job = self._running.get((name, r.uid))
            if job is None:
                continue
            piece = job.answer.step(r.token, r.finish_reason)
            event = Event(text=piece, completion_tokens=len(job.answer.tokens))
            if job.top_logprobs is not None and r.finish_reason != "stop":
                event.logprobs.append(self._logprob(r.token, r.logprobs, job.top_logprobs))
            finish = job.answer.finish_reason
            if finish is not None:
                event.finish_reason = finish
                if r.finish_reason is None:  # a stop string: the generator does not know
                    self._remove(job)
                else:
                    del self._running[(name, r.uid)]
                    self._keep_prefix(name, r.all_tokens, r.prompt_cache)
                    self._finish(job)
            if job.whole:
                job.held.text += event.text
                job.held.logprobs += event.logprobs
                if finish is None:
                    continue
                event.text, event.logprobs = job.held.text, job.held.logprobs
            if event.text or event.logprobs or finish:
                _deliver(job, event)

    def _reuse(self, job: Job) -> tuple[list | None, list[int]]:
        """(a KV cache holding the longest stored prefix of the prompt, the rest of the
        prompt); at least the last prompt token is left to feed."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self._prefixes.fetch_nearest_cache(job.model, job.ids)
        if cache is not None and not rest:  # the very same prompt again
            if not can_trim_prompt_cache(cache):
                return None, job.ids
            trim_prompt_cache(cache, 1)
            rest = job.ids[-1:]
        self.reused_tokens += len(job.ids) - len(rest)
        return cache, rest

    def _keep_prefix(self, name: str, tokens: list[int] | None, cache: list | None) -> None:
        """Remember a finished sequence's KV cache: a later prompt that starts with the same
        tokens (the next turn of a chat) processes only what follows them."""
        if self._prefixes is not None and tokens and cache:
            # A sequence's cache is lazily cut out of its batch's: until evaluated it holds the
            # whole batch's KV buffer alive, which its byte count does not see.
            self._mx.eval([c.state for c in cache])
            self._prefixes.insert_cache(name, list(tokens), cache)

    def _logprob(self, token: int, logprobs, k: int) -> TokenLogprob:
        mx = self._mx
        if self._mask is not None:
            logprobs = self._mask(None, logprobs[None])[0]
            logprobs = logprobs - mx.logsumexp(logprobs)
        top: list[tuple[int, float]] = []
        if k:
            ids = mx.argpartition(-logprobs, k - 1)[:k]
            values = logprobs[ids]
            top = sorted(zip(ids.tolist(), values.tolist(), strict=True), key=lambda t: -t[1])
        return TokenLogprob(token, logprobs[token].item(), top)


def _deliver(job: Job, event: Event) -> None:
    try:
        job.deliver(event)
    except Exception:  # noqa: BLE001 - a client's loop already closed: nothing to tell
        log.debug("an event could not be delivered", exc_info=True)
