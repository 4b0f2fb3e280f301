"""preference: DPO trained pairs/s and peak memory, with the reference cached vs recomputed.

Same model (Llama-shaped, fp32, built by the train suite's builder), generated pairs (a prompt of
~40–200 tokens, answers of ~10–80), LoRA rank 8 on every linear layer, AdamW, batch 4 pairs,
the compiled training step of `mlxlocal run`. "cached" is what `run` does: the base's scores
of every pair are computed once before training (that time included); "recompute" scores the
reference every step with the adapters switched off (`preference.adapters_off`), as trainers
without a cache do. Each contender runs in its own child process, alternately A/B/A/B.
Target (issue 18): cached ≤ 0.6× the time per step of recompute.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from .common import alternate, measure
from .train import MODULES, _model

SIZES = {  # hidden, layers, vocab, pairs, steps
    "smoke": (64, 2, 1024, 8, 2),  # the code path only (CI)
    "tiny": (256, 4, 8192, 64, 16),
    "small": (512, 8, 32000, 64, 16),
    "medium": (1024, 12, 32000, 64, 16),
}
DRIVER = """
import json, sys, time
import mlx.core as mx, mlx.optimizers as optim, numpy as np
from mlxlocal.adapters.layers import add_adapters
from mlxlocal.data import Example, Pair
from mlxlocal.models import load
from mlxlocal.train.batches import iterate_pair_batches
from mlxlocal.train.preference import (
    Objective, adapters_off, reference_logps, sequence_logps, with_reference)
from mlxlocal.train.trainer import make_step

path, mode, pairs_n, steps, vocab, out = sys.argv[1:7]
pairs_n, steps, vocab = int(pairs_n), int(steps), int(vocab)
rng = np.random.default_rng(0)
def example(prompt, n):
    answer = rng.integers(3, vocab, n).tolist()
    return Example(prompt + answer, [0] * len(prompt) + [1] * n)
pairs = []
for _ in range(pairs_n):
    prompt = rng.integers(3, vocab, int(rng.integers(40, 200))).tolist()
    pairs.append(Pair(example(prompt, int(rng.integers(10, 80))),
                      example(prompt, int(rng.integers(10, 80)))))
model, _ = load(path)
mx.eval(model.parameters())
start = time.perf_counter()
cache = reference_logps(model, pairs, 4, 512) if mode == "cached" else None
keys = json.loads(sys.argv[7])
add_adapters(model, "lora", 8, 2.0, 0.0, keys, list(range(len(model.layers))))
opt = optim.AdamW(learning_rate=1e-4)
opt.init(model.trainable_parameters())
step = make_step(model, opt, objective=Objective("dpo"))
state = [model.state, opt.state, mx.random.state]
batches = iterate_pair_batches(pairs, 4, 512, 0, 0)
for i in range(steps):
    b = next(batches, None) or next(batches := iterate_pair_batches(pairs, 4, 512, 0, i))
    if cache is None:
        with adapters_off(model):
            ref, _ = sequence_logps(model, b.tokens, b.weights)
        b.reference = mx.stop_gradient(ref)
    else:
        b = with_reference(b, cache)
    loss, n, *_ = step([b])
    mx.eval(state, loss)
seconds = time.perf_counter() - start
json.dump({"seconds": seconds, "peak_gb": mx.get_peak_memory() / 1e9}, open(out, "w"))
"""


def run(size: str, reps: int, work: Path) -> dict:
    hidden, layers, vocab, pairs, steps = SIZES[size]
    model = _model(work, hidden, layers, vocab)
    keys = json.dumps([f"self_attn.{m}" for m in MODULES[:4]] + [f"mlp.{m}" for m in MODULES[4:]])
    results: dict[str, list[dict]] = {"cached": [], "recompute": []}

    def contender(mode: str):
        def once():
            out = work / f"preference-{mode}.json"
            cmd = [sys.executable, "-c", DRIVER, str(model), mode, str(pairs), str(steps)]
            run_ = measure([*cmd, str(vocab), str(out), keys])
            record = json.loads(out.read_text()) | {"rss_mb": run_.peak_rss_mb}
            results[mode].append(record)
            return run_

        return once

    alternate({mode: contender(mode) for mode in results}, reps)
    summary = {}
    for mode, records in results.items():
        seconds = statistics.median(r["seconds"] for r in records)
        summary[mode] = {
            "seconds_per_step": seconds / steps,
            "pairs_per_s": steps * 4 / seconds,
            "peak_gb": statistics.median(r["peak_gb"] for r in records),
        }
    summary["ratio"] = (
        summary["cached"]["seconds_per_step"] / summary["recompute"]["seconds_per_step"]
    )
    return {"size": size, "steps": steps, "pairs": pairs, **summary}


def table(result: dict) -> list[str]:
    c, r = result["cached"], result["recompute"]
    return [
        f"| DPO pairs/s, cached reference vs recomputed | {c['pairs_per_s']:.1f} | "
        f"{r['pairs_per_s']:.1f} | {result['ratio']:.2f}× time | ≤ 0.60× |",
        f"| DPO peak memory GB (MLX), cached vs recomputed | {c['peak_gb']:.2f} | "
        f"{r['peak_gb']:.2f} | | |",
    ]
