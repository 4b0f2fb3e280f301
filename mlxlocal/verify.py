"""`convert --verify`: the converted model must give the source model's next-token distribution.

transformers (with PyTorch) is the reference; both run on the same probe prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import MlxLocalError
from .models import file_at_fault, load, read_config
from .sources import resolve_source

PROBES = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 1, 2, 3, 5, 8, 13,",
)
# Mean KL(source || converted) allowed per output dtype, and minimum top-1 agreement.
TOLERANCE = {"float32": (1e-6, 0.99), "float16": (1e-3, 0.95), "bfloat16": (1e-2, 0.9)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max |Δlogit|, mean KL(reference || candidate) and top-1 agreement over positions."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "max_abs_logit_diff": float(np.abs(ref - cand).max()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).mean()),
    }


def verify_conversion(
    src: str | Path, converted: str | Path, *, revision: str | None = None
) -> dict[str, Any]:
    """Run both models on the probe prompts and judge the difference against TOLERANCE."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise MlxLocalError(
            "--verify needs transformers and torch as the reference: pip install torch transformers"
        ) from e
    import mlx.core as mx
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src_dir = resolve_source(src, revision)
    dtype = read_config(Path(converted)).get("dtype", "float32")
    try:  # the source's config is read by transformers again, by its own rules
        reference = AutoModelForCausalLM.from_pretrained(
            src_dir, dtype=torch.float32, trust_remote_code=False
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False)
    except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
        found = file_at_fault(src_dir, e)  # a broken tokenizer file, a bad dtype: named
        problem = f"transformers cannot load {src} as the reference ({' '.join(str(e).split())})"
        raise MlxLocalError(
            f"--verify: {found or problem[:300]}; the converted model is written, but "
            "unverified — fix the source to verify"
        ) from e
    model, _ = load(converted)
    vocab = reference.config.vocab_size
    refs, cands = [], []
    for prompt in PROBES:
        ids = tokenizer(prompt)["input_ids"][:64] or [0]
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0, :, :vocab].float().numpy()
        out = model(mx.array([ids]))[0, :, :vocab].astype(mx.float32)
        refs.append(ref)
        cands.append(np.array(out))
    del reference
    report = compare_logits(np.concatenate(refs), np.concatenate(cands))
    max_kl, min_top1 = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    report.update(
        dtype=dtype,
        probes=len(PROBES),
        tolerance={"mean_kl": max_kl, "top1_agreement": min_top1},
        passed=report["mean_kl"] <= max_kl and report["top1_agreement"] >= min_top1,
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    tol = report["tolerance"]
    verdict = "PASS" if report["passed"] else "FAIL"
    return (
        f"verify ({report['dtype']}, {report['probes']} probes): {verdict}  "
        f"max|Δlogit| {report['max_abs_logit_diff']:.2e}  "
        f"mean KL {report['mean_kl']:.2e} (≤ {tol['mean_kl']:.0e})  "
        f"top-1 {report['top1_agreement']:.1%} (≥ {tol['top1_agreement']:.0%})"
    )
