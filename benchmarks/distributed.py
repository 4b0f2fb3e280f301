"""distributed: what decides data-parallel scaling, measured here, and the scaling it implies.

Measured on this machine: the bytes one optimizer step all-reduces (the trainable parameters'
gradients: LoRA vs full fine-tuning of the benchmark model), the time of one all-reduce of such
sizes between 2 ranks over the ring back end on loopback (`mlx.launch -n 2 --backend ring`),
and `mlxlocal run`'s step time with 1 process and with 2 ranks. Two ranks on a couple of cores
is no speed test: the step times show the overhead, not a speed-up.

Computed, not measured: the expected scaling of the Qwen2.5 1.5B LoRA and 7B QLoRA recipes on
2/4/8 Macs over Thunderbolt 4/5 and 10 GbE, from the gradient bytes of those models, a ring
all-reduce's 2(N-1)/N traffic per link, stated link speeds and an assumed Mac throughput.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from .common import measure

# float32 elements per all-reduce: 16 KiB ... 64 MiB
SIZES = [4096, 65536, 1 << 20, 1 << 24]
SMOKE = ([4096, 65536], 2, 3)  # all-reduce sizes, timings each, training steps at --size smoke
DRIVER = """
import json, sys, time
import mlx.core as mx
group = mx.distributed.init()
out = {}
for n in map(int, sys.argv[2].split(",")):
    x = mx.ones((n,))
    mx.eval(mx.distributed.all_sum(x))  # warm up the connections
    times = []
    for _ in range(int(sys.argv[3])):
        tic = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x))
        times.append(time.perf_counter() - tic)
    out[n * 4] = sorted(times)[len(times) // 2]
if group.rank() == 0:
    open(sys.argv[1], "w").write(json.dumps(out))
"""

# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-1.5B-Instruct and -7B-Instruct):
# hidden, intermediate, layers, kv width, vocab, parameters.
QWEN = {"1.5B": (1536, 8960, 28, 256, 151936, 1.54e9), "7B": (3584, 18944, 28, 512, 152064, 7.6e9)}
# (recipe, model, method, gradient bytes/element, tokens per rank-step): recipes/qwen2.5-*.yaml
# (LoRA rank 8 on q/k/v/o, float32 adapters; batch × accumulation × max_length 1024, packed).
RECIPES = [
    ("qwen2.5-1.5b-lora", "1.5B", "lora", 4, 4 * 1024),
    ("qwen2.5-7b-qlora", "7B", "lora", 4, 2 * 2 * 1024),
    ("qwen2.5-1.5b full (bf16)", "1.5B", "full", 2, 4 * 1024),
]
# Usable bytes/s per link for IP traffic (assumed: about half of Thunderbolt's signalling
# rate reaches TCP over Thunderbolt bridge; 10 GbE at ~94%).
LINKS = {"Thunderbolt 4": 20e9 / 8, "Thunderbolt 5": 40e9 / 8, "10 GbE": 9.4e9 / 8}
MAC_FLOPS = 5e12  # assumed achieved bf16 FLOP/s of one M-series Max-class GPU while training
LATENCY_S = 1e-4  # assumed per ring hop


def trainable(model: str, method: str, rank: int = 8) -> float:
    hidden, _, layers, kv, _, params = QWEN[model]
    if method == "full":
        return params
    per_layer = rank * ((hidden + hidden) * 2 + (hidden + kv) * 2)  # q, o; k, v
    return per_layer * layers


def compute_s(model: str, method: str, tokens: int) -> float:
    """FLOPs of one rank-step / MAC_FLOPS: forward 2PT, recomputed forward (gradient
    checkpointing) 2PT, backward 2PT for activations (+2PT for weights when full)."""
    params = QWEN[model][5]
    return (8 if method == "full" else 6) * params * tokens / MAC_FLOPS


def allreduce_s(nbytes: float, n: int, link: float) -> float:
    """A ring all-reduce: each link carries 2(N-1)/N of the buffer, in 2(N-1) hops."""
    return 2 * (n - 1) / n * nbytes / link + 2 * (n - 1) * LATENCY_S


def scaling() -> list[dict]:
    rows = []
    for name, model, method, width, tokens in RECIPES:
        nbytes = trainable(model, method) * width
        step = compute_s(model, method, tokens)
        for link_name, link in LINKS.items():
            for n in (2, 4, 8):
                comm = allreduce_s(nbytes, n, link)
                rows.append(
                    {
                        "recipe": name,
                        "link": link_name,
                        "macs": n,
                        "gradient_mb": nbytes / 1e6,
                        "compute_s": step,
                        "allreduce_s": comm,
                        "speedup": n * step / (step + comm),  # no overlap: reduce after backward
                    }
                )
    return rows


def _allreduce_times(work: Path, sizes: list[int], timings: int) -> dict[int, float]:
    script, out = work / "allreduce.py", work / "allreduce.json"
    script.write_text(DRIVER)
    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [str(launcher), "-n", "2", "--backend", "ring", "--", sys.executable, str(script)]
    args = [str(out), ",".join(map(str, sizes)), str(timings)]
    subprocess.run([*cmd, *args], check=True, capture_output=True)
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


def _step_times(work: Path, method: str, nproc: int, steps: int) -> tuple[float, int]:
    """(median step seconds after the first, trainable parameters) of a tiny-model run."""
    from mlxlocal.tiny import build_tiny_checkpoint

    model = work / "dist-tiny"
    if not (model / "config.json").exists():
        build_tiny_checkpoint(model)
    folder = work / f"dist-{method}-{nproc}"
    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": "builtin:tiny-chat.jsonl", "max_length": 128},
        "method": {"type": method, "rank": 8, "alpha": 16}
        if method == "lora"
        else {"type": method},
        "training": {"learning_rate": 1e-4, "batch_size": 2, "steps": steps},
        "output": str(folder / "run"),
    }
    if nproc == 1:
        recipe["training"]["grad_accumulation"] = 2  # the same global batch as 2 ranks
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cli = "import sys; from mlxlocal.cli import main; sys.argv[0] = 'mlxlocal'; main()"
    args = [sys.executable, "-c", cli, "run", str(folder / "recipe.yaml")]
    shutil.rmtree(folder / "run", ignore_errors=True)  # this suite's own scratch run
    measure(args + (["--nproc", str(nproc)] if nproc > 1 else []))
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    elapsed = [json.loads(line)["elapsed_s"] for line in lines]
    times = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    summary = json.loads((folder / "run" / "summary.json").read_text())
    return statistics.median(times), summary["trainable_parameters"]


def run(size: str, reps: int, work: Path) -> dict:
    sizes, timings, train_steps = SMOKE if size == "smoke" else (SIZES, max(reps, 5), 8)
    times = _allreduce_times(work, sizes, timings)
    steps = {}
    for method in ("lora", "full"):
        for nproc in (1, 2):
            seconds, params = _step_times(work, method, nproc, train_steps)
            steps[f"{method}-{nproc}"] = {"step_s": seconds, "gradient_bytes": params * 4}
    return {"allreduce_s": times, "steps": steps, "scaling": scaling()}


def table(result: dict) -> list[str]:
    rows = []
    for nbytes, seconds in sorted(result["allreduce_s"].items()):
        mb = int(nbytes) / 1e6
        rows.append(
            f"| all-reduce of {mb:.3g} MB, 2 ranks, ring on loopback "
            f"({mb / 1e3 / seconds:.3f} GB/s) | {seconds * 1e3:.2f} ms | | | |"
        )
    for name, s in result["steps"].items():
        method, ranks = name.split("-")
        reduced = f"{s['gradient_bytes'] / 1e3:.0f} kB all-reduced" if ranks != "1" else "alone"
        rows.append(
            f"| step time, {method}, {ranks} rank(s) ({reduced}) | {s['step_s'] * 1e3:.1f} ms "
            "| | | |"
        )
    return rows


def scaling_markdown() -> str:
    """The README's table (computed, not measured)."""
    lines = [
        "| recipe | gradient MB/step | compute s/step | link | 2 Macs | 4 Macs | 8 Macs |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = scaling()
    for i in range(0, len(rows), 3):
        r = rows[i : i + 3]
        cells = " | ".join(f"{x['speedup']:.2f}× ({x['allreduce_s'] * 1e3:.0f} ms)" for x in r)
        lines.append(
            f"| {r[0]['recipe']} | {r[0]['gradient_mb']:.0f} | {r[0]['compute_s']:.1f} "
            f"| {r[0]['link']} | {cells} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(scaling_markdown())
