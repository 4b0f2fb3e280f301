"""convert: wall time and peak RSS of `mlxlocal convert` vs `mlx_lm convert`, multi-shard source."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import alternate_commands, measure, median, mlx_lm_convert

# hidden, layers, vocab, source shard size: fp16 checkpoints, Llama-shaped.
SIZES = {
    "smoke": (64, 2, 1024, 2**17),  # ~0.4 MB, 3 shards: the code path, not a measurement
    "tiny": (256, 4, 8192, 2 * 2**20),  # ~12 MB
    "small": (1024, 12, 32000, 64 * 2**20),  # ~0.37 GB
    "medium": (1024, 24, 32000, 128 * 2**20),  # ~0.67 GB (~150M parameters)
}


def source_checkpoint(size: str, work: Path) -> Path:
    """The fp16 multi-shard checkpoint for `size` (built once, in a child)."""
    hidden, layers, vocab, shard = SIZES[size]
    src = work / f"src-{size}"
    if not (src / "config.json").exists():
        # In a child process: a forked child starts with its parent's RSS, so the parent must
        # never hold a checkpoint or every later measurement is inflated.
        code = (
            "import sys; from mlxlocal.tiny import build_tiny_checkpoint as b; "
            f"b(sys.argv[1], hidden={hidden}, layers={layers}, vocab={vocab}, "
            f"dtype='float16', shard_bytes={shard})"
        )
        measure([sys.executable, "-c", code, str(src)])
    return src


def run(size: str, reps: int, work: Path) -> dict:
    src = source_checkpoint(size, work)
    source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    outs = {"mlxlocal": work / "out-mlxlocal", "mlx_lm": work / "out-mlx_lm"}
    commands = {
        "mlxlocal": [
            sys.executable,
            "-m",
            "mlxlocal.cli",
            "convert",
            str(src),
            str(outs["mlxlocal"]),
            "--dtype",
            "float16",
            "--shard-size",
            "128MB",
        ],
        "mlx_lm": mlx_lm_convert(src, outs["mlx_lm"], "--dtype", "float16"),
    }
    runs = alternate_commands(commands, outs, reps)
    # What both pay before touching a tensor: Python, MLX, and mlx-lm's import of transformers
    # (and PyTorch, when installed). The work itself is the peak above this floor.
    floor = median(
        [measure([sys.executable, "-c", "import mlxlocal.convert, mlx_lm"]) for _ in range(reps)],
        "peak_rss_mb",
    )
    result = {
        "source_mb": round(source_bytes / 2**20, 1),
        "shards": len(list(src.glob("*.safetensors"))),
        "import_floor_mb": round(floor, 1),
    }
    for name, rs in runs.items():
        peak = median(rs, "peak_rss_mb")
        result[name] = {
            "wall_s": round(median(rs, "wall_s"), 2),
            "peak_rss_mb": round(peak, 1),
            "above_floor_mb": round(peak - floor, 1),
        }
    result["ratio_peak_rss"] = round(
        result["mlxlocal"]["peak_rss_mb"] / result["mlx_lm"]["peak_rss_mb"], 3
    )
    result["ratio_above_floor"] = round(
        result["mlxlocal"]["above_floor_mb"] / result["mlx_lm"]["above_floor_mb"], 3
    )
    result["ratio_wall"] = round(result["mlxlocal"]["wall_s"] / result["mlx_lm"]["wall_s"], 3)
    return result


def table(result: dict) -> list[str]:
    a, b = result["mlxlocal"], result["mlx_lm"]
    return [
        f"| convert peak RSS ({result['source_mb']} MB fp16, {result['shards']} shards) "
        f"| {a['peak_rss_mb']} MB | {b['peak_rss_mb']} MB | {result['ratio_peak_rss']}× | ≤ 0.5× |",
        f"| convert peak RSS above the {result['import_floor_mb']} MB import floor "
        f"| {a['above_floor_mb']} MB | {b['above_floor_mb']} MB | {result['ratio_above_floor']}× "
        "| ≤ 0.5× |",
        f"| convert wall time | {a['wall_s']} s | {b['wall_s']} s | {result['ratio_wall']}× "
        "| ≤ 1.0× |",
    ]
