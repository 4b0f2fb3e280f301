"""generate: prompt and decode tok/s and peak memory of `mlxlocal.generate` vs `mlx_lm.generate`
on the same model in fp32, bf16, 8-bit and 4-bit.

Everything runs in this process on the same loaded model, alternately (A/B/A/B) after a warm-up;
tok/s are counted as mlx-lm counts them (prompt: tokens over the time to the first token;
decode: tokens over the time after it), wall time is measured around each call, and the MLX
peak memory is reset before each.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

# hidden, layers, vocab (fp32, Llama-shaped, context 512).
SIZES = {
    "smoke": (64, 2, 1024),  # the code path only (CI), with SMOKE_TOKENS
    "tiny": (256, 4, 8192),  # ~6M parameters
    "small": (512, 8, 32000),  # ~52M parameters
    "medium": (1024, 12, 32000),  # ~170M parameters
}
PROMPT_TOKENS, DECODE_TOKENS = 384, 128
SMOKE_TOKENS = (32, 8)  # prompt, decode at --size smoke
# How each variant is made from the fp32 source: convert's dtype, or quantize's bits.
VARIANTS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}, "q8": {"bits": 8},
            "q4": {"bits": 4}}  # fmt: skip


def model_path(size: str, work: Path, variant: str = "fp32", fill_vocab: bool = False) -> Path:
    """The benchmark model in `variant`, built once per work folder; with `fill_vocab`, its
    tokenizer has a token for each of the embedding's ids (`build_tiny_checkpoint`)."""
    from mlxlocal.convert import convert
    from mlxlocal.quantize import quantize
    from mlxlocal.tiny import build_tiny_checkpoint

    hidden, layers, vocab = SIZES[size]
    name = f"{size}-filled" if fill_vocab else size
    src, out = work / f"generate-src-{name}", work / f"generate-{name}-{variant}"
    if not (src / "config.json").exists():
        build_tiny_checkpoint(src, hidden=hidden, layers=layers, vocab=vocab, dtype="float32",
                              head_dim=64, fill_vocab=fill_vocab)  # fmt: skip
    if not (out / "config.json").exists():
        how = VARIANTS[variant]
        if "bits" in how:
            quantize(src, out, bits=how["bits"], evaluate=False, force=True)
        else:
            convert(src, out, dtype=how["dtype"], force=True)
    return out


def _generate_figures(lm, reps: int, prompt_tokens: int, decode_tokens: int) -> dict:
    from mlx_lm.generate import stream_generate

    from mlxlocal.generate import stream

    ids = np.random.default_rng(0).integers(3, 500, prompt_tokens).tolist()

    def ours():
        mx.reset_peak_memory()
        tic = time.perf_counter()
        s = stream(lm, ids, max_tokens=decode_tokens)
        for _ in s:
            pass
        r = s.result
        wall = time.perf_counter() - tic
        return r.prompt_tps, r.generation_tps, wall, r.generation_tokens, mx.get_peak_memory()

    def theirs():
        mx.reset_peak_memory()
        tic = time.perf_counter()
        *_, r = stream_generate(lm.model, lm.tokenizer, ids, max_tokens=decode_tokens)
        wall = time.perf_counter() - tic
        return r.prompt_tps, r.generation_tps, wall, r.generation_tokens, mx.get_peak_memory()

    contenders = {"mlxlocal": ours, "mlx_lm": theirs}
    for fn in contenders.values():
        fn()  # warm-up
    runs = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            runs[name].append(fn())
    result = {"prompt_tokens": prompt_tokens}
    for name, rs in runs.items():
        result[name] = {
            "prompt_tps": round(statistics.median(r[0] for r in rs), 1),
            "decode_tps": round(statistics.median(r[1] for r in rs), 1),
            "wall_s": round(statistics.median(r[2] for r in rs), 3),
            "tokens": rs[0][3],
            "peak_gb": round(statistics.median(r[4] for r in rs) / 1e9, 4),
        }
    a, b = result["mlxlocal"], result["mlx_lm"]
    result["ratio_prompt_tps"] = round(a["prompt_tps"] / b["prompt_tps"], 3)
    result["ratio_decode_tps"] = round(a["decode_tps"] / b["decode_tps"], 3)
    result["ratio_wall"] = round(a["wall_s"] / b["wall_s"], 3)
    result["ratio_peak"] = round(a["peak_gb"] / b["peak_gb"], 3)
    return result


def run(size: str, reps: int, work: Path) -> dict:
    from mlxlocal.generate import load_model

    tokens = SMOKE_TOKENS if size == "smoke" else (PROMPT_TOKENS, DECODE_TOKENS)
    figures = {}
    for variant in VARIANTS:
        lm = load_model(model_path(size, work, variant))
        figures[variant] = _generate_figures(lm, reps, *tokens)
        mx.clear_cache()
    return {"size": size, "generate": figures}


def table(result: dict) -> list[str]:
    rows = []
    for variant, g in result["generate"].items():
        ours, theirs = g["mlxlocal"], g["mlx_lm"]
        setup = f"{variant}, {g['prompt_tokens']}-token prompt, {ours['tokens']} new"
        rows += [
            f"| generate prompt tok/s ({setup}) | {ours['prompt_tps']} | {theirs['prompt_tps']} "
            f"| {g['ratio_prompt_tps']}× | ≥ 0.95× |",
            f"| generate decode tok/s ({setup}) | {ours['decode_tps']} | {theirs['decode_tps']} "
            f"| {g['ratio_decode_tps']}× | ≥ 0.95× |",
            f"| generate peak memory ({variant}) | {ours['peak_gb']} GB | {theirs['peak_gb']} GB "
            f"| {g['ratio_peak']}× | |",
        ]
    return rows
