"""batch: throughput of `mlxlocal.batch` over 256 mixed-length prompts vs generating them one by
one, and vs `mlx_lm.batch_generate` on the same prompts (in input order).

In this process, on the fp32 model of the generate suite, alternately after a warm-up. Batching
pays most where decoding dominates, so two mixes are measured: short prompts with longer
answers, and long prompts with short answers (classification-like). A third has long prompts
made of one shared instruction (a template's) and a short record: there `batch` processes the
instruction once (its prefix cache), also measured with `prefix_cache=False`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .generate import model_path

RECORDS, BATCH_SIZE = 256, 32
SMOKE = (8, 4, 8)  # records, batch size, most new tokens at --size smoke (the code path only)
# Prompt length range in words (the chat template adds ~8 tokens), max_tokens, and the words of
# an instruction every prompt starts with (a template's), if any.
MIXES = {
    "short prompts": ((4, 48), 64, 0),
    "long prompts": ((48, 240), 16, 0),
    "shared-prefix long prompts": ((4, 48), 16, 200),
}
WORDS = "the quick brown fox jumps over a lazy dog while your local model keeps the data".split()


def _batch_figures(
    lm,
    reps: int,
    words: tuple[int, int],
    max_tokens: int,
    shared: int,
    work: Path,
    records_n: int = RECORDS,
    batch_size: int = BATCH_SIZE,
) -> dict:
    from mlx_lm.generate import batch_generate

    from mlxlocal.batch import batch, common_prefix
    from mlxlocal.generate import encode_prompt, generate

    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, n)) for n in rng.integers(*words, records_n)]
    template = " ".join(rng.choice(WORDS, shared)) + "\n\n{text}" if shared else "{text}"
    prompts = [template.format(text=t) for t in texts]
    records = work / "generate-batch-in.jsonl"
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ids = [encode_prompt(lm.tokenizer, p) for p in prompts]

    def ours(prefix_cache: bool = True):
        tic = time.perf_counter()
        r = batch(lm, records, work / "generate-batch-out.jsonl", template=template,
                  max_tokens=max_tokens, batch_size=batch_size, force=True,
                  prefix_cache=prefix_cache)  # fmt: skip
        return time.perf_counter() - tic, r.generated_tokens

    def one_by_one():
        tic = time.perf_counter()
        tokens = sum(generate(lm, p, max_tokens=max_tokens).generation_tokens for p in prompts)
        return time.perf_counter() - tic, tokens

    def mlx_lm_batch():
        tic = time.perf_counter()
        r = batch_generate(lm.model, lm.tokenizer, ids, max_tokens=max_tokens,
                           completion_batch_size=batch_size, return_token_ids=True)  # fmt: skip
        return time.perf_counter() - tic, sum(len(t) for t in r.token_ids)

    contenders = {"batch": ours, "one_by_one": one_by_one, "mlx_lm_batch": mlx_lm_batch}
    if shared:
        contenders["batch_no_prefix_cache"] = lambda: ours(prefix_cache=False)
    ours()  # warm-up
    runs = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            runs[name].append(fn())
    result = {
        "records": records_n,
        "prompt_tokens": f"{min(map(len, ids))}–{max(map(len, ids))}",
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "shared_prefix_tokens": len(common_prefix(ids)) if shared else 0,
    }
    for name, rs in runs.items():
        wall = statistics.median(r[0] for r in rs)
        result[name] = {
            "wall_s": round(wall, 2),
            "records_per_s": round(records_n / wall, 2),
            "tok_per_s": round(rs[0][1] / wall, 1),
            "tokens": rs[0][1],
        }
    result["ratio_vs_one_by_one"] = round(
        result["one_by_one"]["wall_s"] / result["batch"]["wall_s"], 2
    )
    result["ratio_vs_mlx_lm_batch"] = round(
        result["mlx_lm_batch"]["wall_s"] / result["batch"]["wall_s"], 3
    )
    if shared:
        result["ratio_vs_no_prefix_cache"] = round(
            result["batch_no_prefix_cache"]["wall_s"] / result["batch"]["wall_s"], 2
        )
    return result


def run(size: str, reps: int, work: Path) -> dict:
    from mlxlocal.generate import load_model

    lm = load_model(model_path(size, work))
    count, batch_size, most = SMOKE if size == "smoke" else (RECORDS, BATCH_SIZE, 10**9)
    return {
        mix: _batch_figures(lm, reps, words, min(max_tokens, most), shared, work, count, batch_size)
        for mix, (words, max_tokens, shared) in MIXES.items()
    }


def table(result: dict) -> list[str]:
    rows = []
    for mix, b in result.items():
        shared = b.get("shared_prefix_tokens")
        mixed = (
            f"{mix}: {b['records']} × {b['prompt_tokens']} tokens"
            + (f" ({shared} shared)" if shared else "")
            + f", ≤ {b['max_tokens']} new, batch {b['batch_size']}"
        )
        rows += [
            f"| batch throughput ({mixed}) vs mlxlocal one by one "
            f"| {b['batch']['tok_per_s']} tok/s "
            f"| {b['one_by_one']['tok_per_s']} tok/s (one by one) "
            f"| {b['ratio_vs_one_by_one']}× | ≥ 3× |",
            f"| batch throughput ({mixed}) vs mlx_lm.batch_generate "
            f"| {b['batch']['tok_per_s']} tok/s | {b['mlx_lm_batch']['tok_per_s']} tok/s "
            f"| {b['ratio_vs_mlx_lm_batch']}× | ≥ 0.95× |",
        ]
        if "batch_no_prefix_cache" in b:
            rows.append(
                f"| batch throughput ({mixed}) with vs without the prefix cache "
                f"| {b['batch']['tok_per_s']} tok/s "
                f"| {b['batch_no_prefix_cache']['tok_per_s']} tok/s (--no-prefix-cache) "
                f"| {b['ratio_vs_no_prefix_cache']}× | |"
            )
    return rows
