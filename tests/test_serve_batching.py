"""The serving loop's decode batch (`mlxlocal.serve.batching`): sequences that join at different
steps, wait for a free row, have their prompts processed a few tokens a step, leave early or
come back with their KV cache all answer as each would alone (`mlxlocal generate`), and their
log-probabilities are the model's."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxlocal.generate import Sampling, generate
from mlxlocal.serve.batching import DecodeBatch

TEXTS = [
    "hi",
    "the cat sat",
    "a longer prompt about the weather and the sea",
    "one two three four five six seven eight nine ten eleven twelve",
    "what is the capital of the country whose flag is red and white, and why",
]


def prompts(lm) -> list[list[int]]:
    ids = [lm.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    return [ids[0][:1], *ids[1:]]  # a one-token prompt: nothing to process before decoding


def batch(lm, **options) -> DecodeBatch:
    greedy = lm.batch_sampler(Sampling(temp=0.0))
    return DecodeBatch(lm.model, lm.stop_ids, greedy, **options)


def run(b: DecodeBatch, answers: dict[int, list]) -> None:
    """Step until every sequence in `b` has ended, collecting its responses by uid."""
    while len(b):
        for r in b.next():
            answers.setdefault(r.uid, []).append(r)


def test_rows_joining_at_different_steps_answer_as_alone(tiny_lm):
    """Five prompts (1 to 42 tokens) through 3 rows, 2 prompts processed at a time, 4 tokens a
    step (so a group's prompts span steps, right-padded), two of them sent after decoding
    started: each answer is token for token the one-sequence greedy answer."""
    ids = prompts(tiny_lm)
    b = batch(tiny_lm, max_rows=3, prefill_rows=2, prefill_step=4)
    uids = [b.insert(p, 12) for p in ids[:3]]
    answers: dict[int, list] = {}
    while not answers:  # the late prompts come once decoding has started
        for r in b.next():
            answers.setdefault(r.uid, []).append(r)
    uids += [b.insert(p, 12) for p in ids[3:]]
    run(b, answers)
    for uid, p in zip(uids, ids, strict=True):
        alone = generate(tiny_lm, p, max_tokens=12)
        got = answers[uid]
        assert [r.token for r in got] == alone.tokens
        assert got[-1].finish_reason == alone.finish_reason
        assert all(r.finish_reason is None for r in got[:-1])


def test_log_probabilities_are_the_models(tiny_lm):
    """A row that asks for them gets, with each token, the normalised log-probabilities it was
    drawn from: equal to one forward pass over the whole sequence (atol 1e-4); a row that does
    not ask gets none."""
    ids = prompts(tiny_lm)
    b = batch(tiny_lm)
    asked = b.insert(ids[2], 6, logprobs=True)
    plain = b.insert(ids[3], 6)
    answers: dict[int, list] = {}
    run(b, answers)
    assert all(r.logprobs is None for r in answers[plain])
    got = answers[asked]
    tokens = ids[2] + [r.token for r in got]
    logits = tiny_lm.model(mx.array(tokens)[None])[0]
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    start = len(ids[2]) - 1
    for k, r in enumerate(got):
        np.testing.assert_allclose(np.array(r.logprobs), np.array(expected[start + k]), atol=1e-4)
        assert int(mx.argmax(r.logprobs)) == r.token


def test_leaving_early_and_coming_back_with_the_cache(tiny_lm):
    """Removed while waiting, while its prompt is being processed, or while decoding: the
    others' answers do not change. The KV cache a decoding row leaves with holds exactly its
    tokens, and a longer prompt sent back with it answers as the whole prompt alone."""
    ids = prompts(tiny_lm)
    b = batch(tiny_lm, max_rows=4, prefill_rows=2, prefill_step=2)
    mid_decode = b.insert(ids[1], 12)
    mid_fill = b.insert(ids[4], 12)
    stays = b.insert(ids[3], 12)
    waiting = b.insert(ids[2], 12)
    assert b.remove(waiting) is None
    b.next()  # the first group (mid_decode, mid_fill) has its first 2 prompt tokens processed
    assert b.remove(mid_fill) is None
    answers: dict[int, list] = {}
    while len(answers.get(mid_decode, [])) < 3:
        for r in b.next():
            answers.setdefault(r.uid, []).append(r)
    cache, tokens = b.remove(mid_decode, keep_cache=True)
    assert tokens[: len(ids[1])] == ids[1]
    assert all(c.offset == len(tokens) for c in cache)
    run(b, answers)
    assert mid_fill not in answers and waiting not in answers
    assert [r.token for r in answers[stays]] == generate(tiny_lm, ids[3], max_tokens=12).tokens

    longer = tokens + ids[2]
    back = b.insert(ids[2], 8, cache=cache, all_tokens=tokens)
    run(b, answers)
    assert [r.token for r in answers[back]] == generate(tiny_lm, longer, max_tokens=8).tokens


def test_bad_sequences_are_refused(tiny_lm):
    b = batch(tiny_lm)
    with pytest.raises(ValueError, match="empty prompt"):
        b.insert([], 4)
    with pytest.raises(ValueError, match="max_tokens"):
        b.insert([1, 2], 0)
    assert len(b) == 0


def test_prompts_are_grouped_by_length():
    """Admitted prompts are processed in groups of similar lengths (padding costs as much as
    tokens): short ones together, long ones together, never more than `most` in a group, and a
    few very short ones not split (each group costs a pass over the weights)."""
    from types import SimpleNamespace

    from mlxlocal.serve.batching import _groups

    def lengths(sizes, most=8):
        rows = [SimpleNamespace(prompt=[0] * (n + 1)) for n in sizes]
        return [[len(r.prompt) - 1 for r in g] for g in _groups(rows, most)]

    assert lengths([60, 11, 61, 10, 12]) == [[10, 11, 12], [60, 61]]
    assert lengths([1, 3, 2, 0]) == [[0, 1, 2, 3]]
    assert lengths([40] * 5, most=2) == [[40], [40, 40], [40, 40]]
    assert lengths([]) == []
