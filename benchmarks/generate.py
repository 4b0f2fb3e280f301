"""generate: prompt and decode tok/s of `mlxlocal.generate` vs `mlx_lm.generate`, and the
throughput of `mlxlocal.batch` over 256 mixed-length prompts vs generating them one by one
(and vs `mlx_lm.batch_generate` on the same prompts in input order).

Everything runs in this process on the same loaded model, alternately (A/B/A/B) after a warm-up;
tok/s are counted as mlx-lm counts them (prompt: tokens over the time to the first token;
decode: tokens over the time after it), and wall time is measured around each call. Batching
pays most where decoding dominates, so two mixes are measured: short prompts with longer
answers, and long prompts with short answers (classification-like).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

# hidden, layers, vocab (fp32, Llama-shaped, context 512).
SIZES = {
    "tiny": (256, 4, 8192),  # ~6M parameters
    "small": (512, 8, 32000),  # ~52M parameters
    "medium": (1024, 12, 32000),  # ~170M parameters
}
PROMPT_TOKENS, DECODE_TOKENS = 384, 128
RECORDS, BATCH_SIZE = 256, 32
# Batch mixes: prompt length range in words (the chat template adds ~8 tokens), max_tokens.
MIXES = {"short prompts": ((4, 48), 64), "long prompts": ((48, 240), 16)}
WORDS = "the quick brown fox jumps over a lazy dog while your local model keeps the data".split()


def _model(size: str, work: Path) -> Path:
    from mlxlocal.convert import convert
    from mlxlocal.tiny import build_tiny_checkpoint

    hidden, layers, vocab = SIZES[size]
    src, out = work / f"generate-src-{size}", work / f"generate-mlx-{size}"
    if not (out / "config.json").exists():
        build_tiny_checkpoint(src, hidden=hidden, layers=layers, vocab=vocab, dtype="float32")
        convert(src, out, force=True)
    return out


def _generate_figures(lm, reps: int) -> dict:
    from mlx_lm.generate import stream_generate

    from mlxlocal.generate import stream

    ids = np.random.default_rng(0).integers(3, 500, PROMPT_TOKENS).tolist()

    def ours():
        tic = time.perf_counter()
        s = stream(lm, ids, max_tokens=DECODE_TOKENS)
        for _ in s:
            pass
        r = s.result
        return r.prompt_tps, r.generation_tps, time.perf_counter() - tic, r.generation_tokens

    def theirs():
        tic = time.perf_counter()
        *_, r = stream_generate(lm.model, lm.tokenizer, ids, max_tokens=DECODE_TOKENS)
        return r.prompt_tps, r.generation_tps, time.perf_counter() - tic, r.generation_tokens

    contenders = {"mlxlocal": ours, "mlx_lm": theirs}
    for fn in contenders.values():
        fn()  # warm-up
    runs = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            runs[name].append(fn())
    result = {}
    for name, rs in runs.items():
        result[name] = {
            "prompt_tps": round(statistics.median(r[0] for r in rs), 1),
            "decode_tps": round(statistics.median(r[1] for r in rs), 1),
            "wall_s": round(statistics.median(r[2] for r in rs), 3),
            "tokens": rs[0][3],
        }
    a, b = result["mlxlocal"], result["mlx_lm"]
    result["ratio_prompt_tps"] = round(a["prompt_tps"] / b["prompt_tps"], 3)
    result["ratio_decode_tps"] = round(a["decode_tps"] / b["decode_tps"], 3)
    result["ratio_wall"] = round(a["wall_s"] / b["wall_s"], 3)
    return result


def _batch_figures(lm, reps: int, words: tuple[int, int], max_tokens: int, work: Path) -> dict:
    from mlx_lm.generate import batch_generate

    from mlxlocal.batch import batch
    from mlxlocal.generate import encode_prompt, generate

    rng = np.random.default_rng(1)
    prompts = [" ".join(rng.choice(WORDS, n)) for n in rng.integers(*words, RECORDS)]
    records = work / "generate-batch-in.jsonl"
    records.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    ids = [encode_prompt(lm.tokenizer, p) for p in prompts]

    def ours():
        tic = time.perf_counter()
        r = batch(lm, records, work / "generate-batch-out.jsonl", max_tokens=max_tokens,
                  batch_size=BATCH_SIZE, force=True)  # fmt: skip
        return time.perf_counter() - tic, r.generated_tokens

    def one_by_one():
        tic = time.perf_counter()
        tokens = sum(generate(lm, p, max_tokens=max_tokens).generation_tokens for p in prompts)
        return time.perf_counter() - tic, tokens

    def mlx_lm_batch():
        tic = time.perf_counter()
        r = batch_generate(lm.model, lm.tokenizer, ids, max_tokens=max_tokens,
                           completion_batch_size=BATCH_SIZE, return_token_ids=True)  # fmt: skip
        return time.perf_counter() - tic, sum(len(t) for t in r.token_ids)

    contenders = {"batch": ours, "one_by_one": one_by_one, "mlx_lm_batch": mlx_lm_batch}
    ours()  # warm-up
    runs = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            runs[name].append(fn())
    result = {
        "records": RECORDS,
        "prompt_tokens": f"{min(map(len, ids))}–{max(map(len, ids))}",
        "max_tokens": max_tokens,
        "batch_size": BATCH_SIZE,
    }
    for name, rs in runs.items():
        wall = statistics.median(r[0] for r in rs)
        result[name] = {
            "wall_s": round(wall, 2),
            "records_per_s": round(RECORDS / wall, 2),
            "tok_per_s": round(rs[0][1] / wall, 1),
            "tokens": rs[0][1],
        }
    result["ratio_vs_one_by_one"] = round(
        result["one_by_one"]["wall_s"] / result["batch"]["wall_s"], 2
    )
    result["ratio_vs_mlx_lm_batch"] = round(
        result["mlx_lm_batch"]["wall_s"] / result["batch"]["wall_s"], 3
    )
    return result


def run(size: str, reps: int, work: Path) -> dict:
    from mlxlocal.generate import load_model

    lm = load_model(_model(size, work))
    return {
        "size": size,
        "generate": _generate_figures(lm, reps),
        "batch": {
            mix: _batch_figures(lm, reps, words, max_tokens, work)
            for mix, (words, max_tokens) in MIXES.items()
        },
    }


def table(result: dict) -> list[str]:
    g = result["generate"]
    ours, theirs = g["mlxlocal"], g["mlx_lm"]
    setup = f"{PROMPT_TOKENS}-token prompt, {ours['tokens']} tokens"
    rows = [
        f"| generate prompt tok/s ({setup}) | {ours['prompt_tps']} | {theirs['prompt_tps']} "
        f"| {g['ratio_prompt_tps']}× | ≥ 0.95× |",
        f"| generate decode tok/s ({setup}) | {ours['decode_tps']} | {theirs['decode_tps']} "
        f"| {g['ratio_decode_tps']}× | ≥ 0.95× |",
        f"| generate wall time ({setup}) | {ours['wall_s']} s | {theirs['wall_s']} s "
        f"| {g['ratio_wall']}× | ≤ 1.05× |",
    ]
    for mix, b in result["batch"].items():
        mixed = (
            f"{mix}: {b['records']} × {b['prompt_tokens']} tokens, ≤ {b['max_tokens']} new, "
            f"batch {b['batch_size']}"
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
    return rows
