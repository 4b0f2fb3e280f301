"""constrained: decode tok/s of `generate` under a constraint vs the same model unconstrained
(targets: ≥ 0.9× for choices, ≥ 0.8× for a JSON schema), and of `batch` under a JSON schema vs
unconstrained `batch`.

The constraint's cost is llguidance's mask (computed on the CPU for every token) plus the
lost overlap of the next step with the current one (the mask needs the token just sampled).
Runs alternate (A/B/A/B) after a warm-up on the generate suite's fp32 model; tok/s are counted
as mlx-lm counts them (tokens after the first over the time after it).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .generate import model_path

DECODE_TOKENS = 128
# Long labels, so each answer decodes tens of tokens (a one-token label has no decode rate).
LABELS = [
    "the customer reports that the application crashes when opening the settings page",
    "the customer asks how to change the email address linked to their account today",
    "the customer praises the new release and thanks the whole team for the dark mode",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"enum": ["bug", "question", "praise"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 200},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}},
    },
    "required": ["category", "priority", "summary", "tags"],
}
BATCH_RECORDS, BATCH_SIZE = 32, 16
SMOKE = (16, 4, 4)  # decode tokens, batch records, batch size at --size smoke (the code path)


def _decode_figures(lm, reps: int, decode_tokens: int) -> dict:
    from mlxlocal.generate import Sampling, stream

    ids = np.random.default_rng(0).integers(3, 500, 64).tolist()
    sampling = Sampling(temp=0.8, seed=0)  # sampled, so answers run on rather than repeat

    def contender(**constraint):
        def once() -> tuple[float, int]:
            s = stream(lm, ids, max_tokens=decode_tokens, sampling=sampling, **constraint)
            for _ in s:
                pass
            return s.result.generation_tps, s.result.generation_tokens

        return once

    contenders = {
        "unconstrained": contender(),
        "choices": contender(choices=LABELS),
        "json_schema": contender(json_schema=SCHEMA),
    }
    for fn in contenders.values():
        fn()  # warm-up (and llguidance's one-off tokenizer table)
    runs = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            runs[name].append(fn())
    base = statistics.median(r[0] for r in runs["unconstrained"])
    result = {}
    for name, rs in runs.items():
        tps = statistics.median(r[0] for r in rs)
        result[name] = {"decode_tps": round(tps, 1), "tokens": rs[0][1]}
        result[name]["ratio"] = round(tps / base, 3)
    return result


def _batch_figures(
    lm, reps: int, work: Path, decode_tokens: int, records: int, batch_size: int
) -> dict:
    from mlxlocal.batch import batch
    from mlxlocal.generate import Sampling

    src = work / "constrained-batch.jsonl"
    src.write_text("".join(json.dumps({"text": f"ticket {i}: " + "words " * (i % 7)}) + "\n"
                           for i in range(records)))  # fmt: skip

    def contender(**constraint):
        def once() -> float:
            tic = time.perf_counter()
            r = batch(lm, src, work / "constrained-out.jsonl", max_tokens=decode_tokens // 2,
                      batch_size=batch_size, sampling=Sampling(temp=0.8, seed=0), force=True,
                      **constraint)  # fmt: skip
            return r.generated_tokens / (time.perf_counter() - tic)

        return once

    contenders = {"unconstrained": contender(), "json_schema": contender(json_schema=SCHEMA)}
    for fn in contenders.values():
        fn()
    runs = {name: [fn() for _ in range(reps)] for name, fn in contenders.items()}
    tps = {name: statistics.median(r) for name, r in runs.items()}
    return {"batch_size": batch_size} | {
        name: {"tps": round(t, 1), "ratio": round(t / tps["unconstrained"], 3)}
        for name, t in tps.items()
    }


def run(size: str, reps: int, work: Path) -> dict:
    from mlxlocal.generate import load_model

    lm = load_model(model_path(size, work))
    tokens, records, batch_size = (
        SMOKE if size == "smoke" else (DECODE_TOKENS, BATCH_RECORDS, BATCH_SIZE)
    )
    return {
        "size": size,
        "decode": _decode_figures(lm, reps, tokens),
        "batch": _batch_figures(lm, reps, work, tokens, records, batch_size),
    }


def table(result: dict) -> list[str]:
    d, b = result["decode"], result["batch"]
    base = d["unconstrained"]["decode_tps"]
    targets = {"choices": "≥ 0.9×", "json_schema": "≥ 0.8×"}
    rows = [
        f"| generate decode tok/s, {name} vs unconstrained ({d[name]['tokens']} tokens) "
        f"| {d[name]['decode_tps']} | {base} | {d[name]['ratio']}× | {target} |"
        for name, target in targets.items()
    ]
    rows.append(
        f"| batch tok/s, json_schema vs unconstrained (batch {b['batch_size']}) "
        f"| {b['json_schema']['tps']} | {b['unconstrained']['tps']} "
        f"| {b['json_schema']['ratio']}× | |"
    )
    return rows
