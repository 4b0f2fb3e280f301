"""quantize: `mlxlocal quantize` vs `mlx_lm convert -q` on the same multi-shard checkpoint (wall
time, peak RSS, real bits per weight), and what 4 bits cost (mean KL, top-1, perplexity) for
uniform, the mixed preset and --target-bpw at the same size.

The checkpoints are random-weight stand-ins (nothing is downloaded): the quality figures show how
the choices rank on one model, not what a trained model would lose.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .common import alternate, measure, median
from .convert import SIZES

# The quality comparison runs the model once per layer and bit width (--target-bpw): keep it on
# a model small enough for two CPU cores.
QUALITY_SIZE = "tiny"


def _source(size: str, work: Path) -> Path:
    """The convert suite's fp16 multi-shard checkpoint for `size` (built once, in a child)."""
    hidden, layers, vocab, shard = SIZES[size]
    src = work / f"src-{size}"
    if not (src / "config.json").exists():
        code = (
            "import sys; from mlxlocal.tiny import build_tiny_checkpoint as b; "
            f"b(sys.argv[1], hidden={hidden}, layers={layers}, vocab={vocab}, "
            f"dtype='float16', shard_bytes={shard})"
        )
        measure([sys.executable, "-c", code, str(src)])
    return src


def _mlxlocal(src: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mlxlocal.cli", "quantize", str(src), str(out), *flags]


def _bpw(out: Path) -> float:
    from mlxlocal.info import info

    return info(out)["quantization"]["bits_per_weight"]


def run(size: str, reps: int, work: Path) -> dict:
    src = _source(size, work)
    outs = {"mlxlocal": work / "q-mlxlocal", "mlx_lm": work / "q-mlx_lm"}
    commands = {
        "mlxlocal": _mlxlocal(src, outs["mlxlocal"], "--bits", "4", "--no-eval"),
        "mlx_lm": [
            sys.executable,
            "-m",
            "mlx_lm",
            "convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(outs["mlx_lm"]),
            "-q",
            "--q-bits",
            "4",
            "--q-group-size",
            "64",
        ],
    }

    def contender(name):
        def once():
            shutil.rmtree(outs[name], ignore_errors=True)
            return measure(commands[name], env={"HF_HUB_OFFLINE": "1"})

        return once

    runs = alternate({name: contender(name) for name in commands}, reps)
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
    result["quality"] = _quality(_source(QUALITY_SIZE, work), work)
    return result


def _quality(src: Path, work: Path) -> dict:
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
        "source": f"{QUALITY_SIZE} ({src.name})",
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
