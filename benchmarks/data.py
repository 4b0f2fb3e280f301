"""data: padding waste of mlxlocal's batching (packing, length buckets) vs mlx-lm's
`iterate_batches` on the same mixed-length chat set, and how fast each turns rows into tokens
with loss masks (ours masks every assistant turn; mlx-lm's `mask_prompt` only the last).

mlx-lm's `lora` wraps its data in `CacheDataset`, whose `itemlen` measures the raw record (a
dict with one key), not its tokens, so its "sort by length" leaves the order as it was; the
suite calls mlx-lm's own functions the way `mlx_lm.lora` does.

The conversations are synthetic (random words, 1–3 exchanges, tens to ~1,000 tokens) and use
the tiny built-in tokenizer and chat template, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from mlxlocal.tiny import CORPUS, write_tokenizer

SIZES = {"smoke": 40, "tiny": 500, "small": 2000, "medium": 8000}
BATCH, MAX_LENGTH = 4, 1024


def _conversations(count: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    words = CORPUS.split()

    def text(mean_words: float) -> str:
        n = int(np.clip(rng.lognormal(np.log(mean_words), 0.9), 2, 300))
        return " ".join(rng.choice(words, n))

    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": "Answer well."}] if rng.random() < 0.5 else []
        for _ in range(rng.integers(1, 4)):
            messages += [
                {"role": "user", "content": text(25)},
                {"role": "assistant", "content": text(60)},
            ]
        out.append(messages)
    return out


def _padding(rows_of_lengths: list[tuple[int, int]]) -> float:
    """(real tokens, padded width) per row → fraction of the batch that is padding."""
    real = sum(r for r, _ in rows_of_lengths)
    return round(1 - real / sum(w for _, w in rows_of_lengths), 4)


def run(size: str, reps: int, work: Path) -> dict:
    from mlx_lm.tokenizer_utils import load
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import iterate_batches as mlx_lm_batches

    from mlxlocal.data import DataSection, load_examples
    from mlxlocal.train.batches import iterate_batches

    folder = work / "data-tokenizer"
    write_tokenizer(folder, context=8192)  # no tokenizer warning: max_length truncates
    tokenizer = load(folder)
    conversations = _conversations(SIZES[size])
    train = work / f"chat-{size}.jsonl"
    train.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    data = DataSection(train=str(train), max_length=MAX_LENGTH)  # truncates, as mlx-lm does

    ours, theirs = [], []
    for _ in range(reps):
        start = time.perf_counter()
        examples, _ = load_examples(data, tokenizer)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        dataset = CacheDataset(
            ChatDataset([{"messages": m} for m in conversations], tokenizer, mask_prompt=True)
        )
        [dataset[i] for i in range(len(dataset))]
        theirs.append(time.perf_counter() - start)
    lengths = [len(dataset[i][0]) for i in range(len(dataset))]

    def mlxlocal_padding(packing: bool) -> float:
        rows = []
        for b in iterate_batches(examples, BATCH, MAX_LENGTH, packing, seed=0, epoch=0):
            segments = np.array(b.segments)
            rows += [(int((s > 0).sum()), s.size) for s in segments]
        return _padding(rows)

    rows = []
    with contextlib.redirect_stdout(io.StringIO()):  # its warnings about truncation
        for tokens, info in mlx_lm_batches(dataset, BATCH, MAX_LENGTH, seed=0):
            rows += [(int(w), tokens.shape[1]) for w in np.array(info)[:, 1]]
    return {
        "conversations": len(conversations),
        "tokens_p10_p50_p90": [int(np.percentile(lengths, q)) for q in (10, 50, 90)],
        "padding": {
            "mlxlocal_packing": mlxlocal_padding(True),
            "mlxlocal_buckets": mlxlocal_padding(False),
            "mlx_lm": _padding(rows),
        },
        "render_examples_per_s": {
            "mlxlocal": round(len(conversations) / float(np.median(ours))),
            "mlx_lm": round(len(conversations) / float(np.median(theirs))),
        },
    }


def table(result: dict) -> list[str]:
    p, r = result["padding"], result["render_examples_per_s"]
    what = (
        f"{result['conversations']} chats, tokens p10/p50/p90 "
        f"{'/'.join(map(str, result['tokens_p10_p50_p90']))}, batch {BATCH} × ≤ {MAX_LENGTH}"
    )
    return [
        f"| padding, packing ({what}) | {p['mlxlocal_packing']:.1%} | {p['mlx_lm']:.1%} "
        "| | lower |",
        f"| padding, length buckets | {p['mlxlocal_buckets']:.1%} | {p['mlx_lm']:.1%} | | lower |",
        f"| chats → tokens + masks per s (all turns vs last turn) | {r['mlxlocal']} "
        f"| {r['mlx_lm']} | {r['mlxlocal'] / r['mlx_lm']:.2f}× | |",
    ]
