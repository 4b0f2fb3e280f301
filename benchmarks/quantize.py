"""quantize: `mlxlocal quantize` vs `mlx_lm convert -q` on the same multi-shard checkpoint (wall
time, peak RSS, real bits per weight), and what 4 bits cost (mean KL, top-1, perplexity) for
uniform, the mixed preset and --target-bpw at the same size.

Nothing is downloaded. The speed/memory checkpoint is the convert suite's random-weight one; the
quality figures come from a small Llama-shaped model trained here for a few hundred steps on the
package's texts (random weights give degenerate, extremely peaked distributions). It has learned
those texts by heart, so the figures show how the choices rank on learned weights, not what a
real model would lose.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .common import alternate_commands, measure, median, mlx_lm_convert
from .convert import source_checkpoint

# hidden, layers, training steps of the quality model (the --target-bpw runs measure every layer
# at every width, so it stays small enough for two CPU cores).
QUALITY_MODEL = (128, 4, 300)
SMOKE_QUALITY_MODEL = (64, 2, 5)  # at --size smoke: the code path, not a measurement


def _mlxlocal(src: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mlxlocal.cli", "quantize", str(src), str(out), *flags]


def _bpw(out: Path) -> float:
    from mlxlocal.info import info

    return info(out)["quantization"]["bits_per_weight"]


def run(size: str, reps: int, work: Path) -> dict:
    src = source_checkpoint(size, work)
    outs = {"mlxlocal": work / "q-mlxlocal", "mlx_lm": work / "q-mlx_lm"}
    commands = {
        "mlxlocal": _mlxlocal(src, outs["mlxlocal"], "--bits", "4", "--no-eval"),
        "mlx_lm": mlx_lm_convert(
            src, outs["mlx_lm"], "-q", "--q-bits", "4", "--q-group-size", "64"
        ),
    }
    runs = alternate_commands(commands, outs, reps)
    result = {
        "source_mb": round(sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20, 1),
        "shards": len(list(src.glob("*.safetensors"))),
    }
    for name, rs in runs.items():
        result[name] = {
            "wall_s": round(median(rs, "wall_s"), 2),
            "peak_rss_mb": round(median(rs, "peak_rss_mb"), 1),
            "bits_per_weight": _bpw(outs[name]),
        }
    # The same quantization with the quality report: the unquantized model and the text runs.
    shutil.rmtree(outs["mlxlocal"])
    evaluated = measure(_mlxlocal(src, outs["mlxlocal"], "--bits", "4"))
    result["mlxlocal_with_report"] = {
        "wall_s": round(evaluated.wall_s, 2),
        "peak_rss_mb": round(evaluated.peak_rss_mb, 1),
    }
    result["ratio_peak_rss"] = round(
        result["mlxlocal"]["peak_rss_mb"] / result["mlx_lm"]["peak_rss_mb"], 3
    )
    result["ratio_wall"] = round(result["mlxlocal"]["wall_s"] / result["mlx_lm"]["wall_s"], 3)
    shape = SMOKE_QUALITY_MODEL if size == "smoke" else QUALITY_MODEL
    result["quality"] = _quality(_quality_model(work, shape), work, shape)
    return result


def _quality_model(work: Path, shape: tuple[int, int, int]) -> Path:
    path = work / "quality-model-{}-{}-{}".format(*shape)
    if not (path / "config.json").exists():
        code = (
            "import sys; from benchmarks.quantize import train_quality_model as t; "
            "t(sys.argv[1], tuple(map(int, sys.argv[2:])))"
        )
        measure([sys.executable, "-c", code, str(path), *map(str, shape)])
    return path


def train_quality_model(out: str, shape: tuple[int, int, int] = QUALITY_MODEL) -> None:
    """Train the tiny Llama (hidden, layers, steps) on the built-in texts (next-token loss,
    AdamW) and save it as an MLX float16 checkpoint at `out`."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    from mlxlocal.calibration_text import CALIBRATION, EVALUATION
    from mlxlocal.convert import convert
    from mlxlocal.models import load
    from mlxlocal.tiny import CORPUS, build_tiny_checkpoint

    hidden, layers, steps = shape
    out = Path(out)
    hf = out.with_name(out.name + "-hf")
    build_tiny_checkpoint(hf, hidden=hidden, layers=layers)
    convert(hf, out, dtype="float32", force=True)
    model, tokenizer = load(out)
    ids = np.array(tokenizer.encode(CORPUS + CALIBRATION + EVALUATION))
    rng = np.random.default_rng(0)
    optimizer = optim.AdamW(learning_rate=1e-3)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y).mean()

    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - 65, 8)
        batch = mx.array(np.stack([ids[s : s + 65] for s in starts]))
        loss, grads = step(model, batch[:, :-1], batch[:, 1:])
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dtype": "float16"}, indent=2))
    print(f"trained {steps} steps, final loss {loss.item():.3f}")


def _quality(src: Path, work: Path, shape: tuple[int, int, int]) -> dict:
    """Quantize one model four ways at 4 bits; read each quality report."""
    variants = {"uniform": ["--bits", "4"], "mixed": ["--bits", "4", "--preset", "mixed"]}
    reports = {
        name: _quantize_report(src, work / f"quality-{name}", flags)
        for name, flags in variants.items()
    }
    for base in ("uniform", "mixed"):
        target = str(reports[base]["bits_per_weight"])
        reports[f"target={base}"] = _quantize_report(
            src, work / f"quality-target-{base}", ["--target-bpw", target]
        )
    return {
        "source": "hidden {}, {} layers, trained {} steps".format(*shape),
        "variants": {
            name: {
                "bits_per_weight": r["bits_per_weight"],
                "mean_kl": round(r["eval"]["mean_kl"], 5),
                "top1_agreement": round(r["eval"]["top1_agreement"], 4),
                "perplexity_before": r["eval"]["perplexity_before"],
                "perplexity_after": r["eval"]["perplexity_after"],
                "wall_s": r["wall_s"],
            }
            for name, r in reports.items()
        },
    }


def _quantize_report(src: Path, out: Path, flags: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    timing = measure(_mlxlocal(src, out, *flags))
    report = json.loads((out / "quantization_report.json").read_text())
    return {**report, "wall_s": round(timing.wall_s, 2)}


def table(result: dict) -> list[str]:
    a, b, e = result["mlxlocal"], result["mlx_lm"], result["mlxlocal_with_report"]
    what = f"{result['source_mb']} MB fp16, {result['shards']} shards, 4-bit g64"
    rows = [
        f"| quantize peak RSS ({what}) | {a['peak_rss_mb']} MB | {b['peak_rss_mb']} MB "
        f"| {result['ratio_peak_rss']}× | ≤ 0.5× |",
        f"| quantize wall time | {a['wall_s']} s | {b['wall_s']} s | {result['ratio_wall']}× "
        "| ≤ 1.0× |",
        f"| real bits per weight | {a['bits_per_weight']} | {b['bits_per_weight']} | | |",
        f"| … with the quality report (wall, peak RSS) | {e['wall_s']} s, {e['peak_rss_mb']} MB "
        "| — | | |",
    ]
    quality = result["quality"]
    for name, v in quality["variants"].items():
        rows.append(
            f"| 4-bit quality, {name} ({quality['source']}): bpw {v['bits_per_weight']}, "
            f"mean KL {v['mean_kl']}, top-1 {v['top1_agreement']:.1%}, "
            f"ppl {v['perplexity_before']} → {v['perplexity_after']} | {v['wall_s']} s | | | |"
        )
    return rows
