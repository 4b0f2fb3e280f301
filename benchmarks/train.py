"""train: trained (non-pad) tokens/s and peak memory of `mlxlocal run` vs mlx-lm's LoRA trainer.

Same model (Llama-shaped, fp32, converted once), same generated chat data (lengths from tens to
~1,000 tokens, log-uniform), LoRA rank 8 on every linear layer of every block, AdamW, one epoch,
alternately A/B/A/B in child processes. mlx-lm runs through its own `train_model` (the function
behind `mlx_lm lora`) with a callback that records its timing; tokens/s on both sides is the
data's non-pad tokens over the training time the tool itself measures (all steps, compilation
included). mlxlocal runs with packing on and off. A second figure: peak memory of a
128k-vocabulary model with and without the chunked loss.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import yaml

from .common import alternate, measure

# hidden, layers, vocab of the model; examples in the data; batch size; max length.
SIZES = {
    "smoke": (64, 2, 1024, 8, 4, 256),  # the code path only (CI)
    "tiny": (256, 4, 8192, 48, 4, 1024),  # ~7M parameters
    "small": (512, 8, 32000, 48, 4, 1024),  # ~52M parameters
    "medium": (1024, 12, 32000, 32, 4, 1024),  # ~170M parameters
}
BIG_VOCAB = (256, 2, 131072, 2, 512, 128)  # hidden, layers, vocab, batch, max length, chunk
SMOKE_BIG_VOCAB = (64, 2, 16384, 2, 128, 64)  # at --size smoke
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = (
    "the quick brown fox jumps over a lazy dog while your local model keeps the data on "
    "your own machine convert quantize fine tune answer question weather film product"
).split()
MLX_LM_DRIVER = """
import json, sys, types, yaml
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import load_dataset
from mlx_lm.utils import load

args = {**lora.CONFIG_DEFAULTS, **yaml.safe_load(open(sys.argv[1]))}
args = types.SimpleNamespace(**args)

class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        open(sys.argv[2], "w").write(json.dumps(info))

model, tokenizer = load(args.model)
train, valid, _ = load_dataset(args, tokenizer)
lora.train_model(args, model, train, valid, Record())
"""


def _model(work: Path, hidden: int, layers: int, vocab: int) -> Path:
    out = work / f"train-mlx-{hidden}-{layers}-{vocab}-hd64-ctx2048"
    if not (out / "config.json").exists():
        # In a child: the parent must not hold a model, or forked children inherit its RSS.
        code = (
            "import sys; from pathlib import Path; from mlxlocal.tiny import build_tiny_checkpoint"
            " as b; from mlxlocal.convert import convert; "
            f"b(Path(sys.argv[1]), hidden={hidden}, layers={layers}, vocab={vocab}, "
            "head_dim=64, context=2048); "
            "convert(sys.argv[1], sys.argv[2], dtype='float32', force=True)"
        )
        measure([sys.executable, "-c", code, str(work / f"{out.name}-hf"), str(out)])
    return out


def _chat_data(folder: Path, examples: int) -> Path:
    """Chat examples whose lengths spread log-uniformly from tens to ~1,000 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for n in np.exp(rng.uniform(math.log(12), math.log(520), examples)).astype(int):
        question = " ".join(rng.choice(WORDS, max(3, n // 3)))
        answer = " ".join(rng.choice(WORDS, max(3, n - n // 3)))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(lines[:4]) + "\n")
    return folder


def _data_tokens(model: Path, data: Path, max_length: int) -> list[int]:
    """Token count of every example, as both tools render them (the model's chat template)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(model)
    lengths = []
    for line in (data / "train.jsonl").read_text().splitlines():
        ids = tokenizer.apply_chat_template(json.loads(line)["messages"], return_dict=False)
        lengths.append(min(len(ids), max_length))
    return lengths


def _recipe(folder: Path, model: Path, data: Path, batch: int, max_length: int, **extra) -> Path:
    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(data / "train.jsonl"), "format": "chat", "max_length": max_length},
        "method": {"type": "lora", "rank": 8, "alpha": 16, "modules": MODULES},
        "training": {"optimizer": "adamw", "learning_rate": 1e-4, "batch_size": batch, "epochs": 1},
        "output": str(folder / "run"),
    }
    for key, value in extra.items():
        section, name = key.split("__")
        recipe[section][name] = value
    path = folder / "recipe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def _ours(folder: Path, recipe: Path) -> dict:
    import shutil

    shutil.rmtree(folder / "run", ignore_errors=True)
    run = measure([sys.executable, "-m", "mlxlocal.cli", "run", str(recipe)])
    summary = json.loads((folder / "run" / "summary.json").read_text())
    return {
        "train_s": summary["training"]["elapsed_s"],
        "steps": summary["total_steps"],
        "tokens": summary["training"]["trained_tokens"],
        "peak_gb": summary["training"]["peak_memory_gb"],
        "rss_mb": run.peak_rss_mb,
    }


def _mlx_lm(folder: Path, model: Path, data: Path, batch: int, max_length: int, n: int) -> dict:
    iters = n // batch  # one epoch, as mlx-lm batches (sorted by length, no packing)
    config = {
        "model": str(model),
        "train": True,
        "data": str(data),
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "num_layers": -1,
        "batch_size": batch,
        "iters": iters,
        "val_batches": 1,
        "learning_rate": 1e-4,
        "steps_per_report": iters,
        "steps_per_eval": 10**9,
        "save_every": 10**9,
        "adapter_path": str(folder / "adapters"),
        "max_seq_length": max_length,
        "mask_prompt": True,
        "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 2.0},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "driver.py").write_text(MLX_LM_DRIVER)
    report = folder / "report.json"
    run = measure(
        [sys.executable, str(folder / "driver.py"), str(folder / "config.yaml"), str(report)]
    )
    info = json.loads(report.read_text())
    return {
        "train_s": info["iteration"] / info["iterations_per_second"],
        "steps": iters,
        "peak_gb": info["peak_memory"],
        "rss_mb": run.peak_rss_mb,
    }


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _summarise(rs: list[dict], tokens: int) -> dict:
    train_s = _median(rs, "train_s")
    return {
        "tokens_per_s": round(tokens / train_s, 1),
        "train_s": round(train_s, 2),
        "steps": rs[0]["steps"],
        "peak_gb": round(_median(rs, "peak_gb"), 3),
        "rss_mb": round(_median(rs, "rss_mb"), 1),
    }


def _throughput(size: str, reps: int, work: Path) -> dict:
    hidden, layers, vocab, n, batch, max_length = SIZES[size]
    model = _model(work, hidden, layers, vocab)
    data = _chat_data(work / f"train-data-{size}", n)
    lengths = _data_tokens(model, data, max_length)
    tokens = sum(lengths)
    folders = {name: work / f"train-{size}-{name}" for name in ("packed", "unpacked", "mlx_lm")}
    recipes = {
        "packed": _recipe(folders["packed"], model, data, batch, max_length),
        "unpacked": _recipe(
            folders["unpacked"], model, data, batch, max_length, data__packing=False
        ),
    }
    contenders = {
        "packed": lambda: _ours(folders["packed"], recipes["packed"]),
        "unpacked": lambda: _ours(folders["unpacked"], recipes["unpacked"]),
        "mlx_lm": lambda: _mlx_lm(folders["mlx_lm"], model, data, batch, max_length, n),
    }
    runs = alternate(contenders, reps)
    result = {
        "model": {"hidden": hidden, "layers": layers, "vocab": vocab},
        "data": {
            "examples": n,
            "tokens": tokens,
            "min": min(lengths),
            "median": int(np.median(lengths)),
            "max": max(lengths),
        },
        "batch_size": batch,
        "max_length": max_length,
    }
    for name, rs in runs.items():
        result[name] = _summarise(rs, tokens)
    theirs = result["mlx_lm"]
    for name in ("packed", "unpacked"):
        result[f"ratio_{name}_tokens_per_s"] = round(
            result[name]["tokens_per_s"] / theirs["tokens_per_s"], 3
        )
        result[f"ratio_{name}_peak_gb"] = round(result[name]["peak_gb"] / theirs["peak_gb"], 3)
    return result


def _chunked_loss(size: str, reps: int, work: Path) -> dict:
    hidden, layers, vocab, batch, max_length, chunk = (
        SMOKE_BIG_VOCAB if size == "smoke" else BIG_VOCAB
    )
    model = _model(work, hidden, layers, vocab)
    data = _chat_data(work / "train-data-big-vocab", 32)
    folders = {name: work / f"train-vocab-{name}" for name in ("full", "chunked")}
    recipes = {
        name: _recipe(
            folders[name],
            model,
            data,
            batch,
            max_length,
            training__epochs=None,
            training__steps=3,
            training__loss_chunk_size=chunk if name == "chunked" else None,
        )
        for name in folders
    }
    runs = alternate({n: (lambda n=n: _ours(folders[n], recipes[n])) for n in folders}, reps)
    result = {"vocab": vocab, "batch_size": batch, "max_length": max_length, "chunk": chunk}
    for name, rs in runs.items():
        result[name] = {
            "peak_gb": round(_median(rs, "peak_gb"), 3),
            "rss_mb": round(_median(rs, "rss_mb"), 1),
        }
    result["logits_gb"] = round(batch * max_length * vocab * 4 / 1e9, 3)
    result["ratio_peak_gb"] = round(result["chunked"]["peak_gb"] / result["full"]["peak_gb"], 3)
    return result


def run(size: str, reps: int, work: Path) -> dict:
    return {
        "throughput": _throughput(size, reps, work),
        "chunked_loss": _chunked_loss(size, reps, work),
    }


def table(result: dict) -> list[str]:
    t, c = result["throughput"], result["chunked_loss"]
    d = t["data"]
    setup = (
        f"{d['examples']} chat examples, {d['min']}–{d['max']} tokens (median {d['median']}), "
        f"batch {t['batch_size']}"
    )
    theirs = t["mlx_lm"]
    rows = []
    for name, label in (("packed", "packing"), ("unpacked", "no packing")):
        ours = t[name]
        rows += [
            f"| LoRA trained tokens/s, {label} ({setup}) | {ours['tokens_per_s']} | "
            f"{theirs['tokens_per_s']} | {t[f'ratio_{name}_tokens_per_s']}× | ≥ 1.5× (packing) |",
            f"| LoRA peak memory (MLX), {label} | {ours['peak_gb']} GB | {theirs['peak_gb']} GB | "
            f"{t[f'ratio_{name}_peak_gb']}× | ≤ 1.0× (packing) |",
            f"| LoRA peak RSS, {label} | {ours['rss_mb']} MB | {theirs['rss_mb']} MB | "
            f"{round(ours['rss_mb'] / theirs['rss_mb'], 3)}× | |",
        ]
    rows.append(
        f"| peak memory, {c['vocab']:,}-vocab model, batch {c['batch_size']}×{c['max_length']}: "
        f"loss in chunks of {c['chunk']} vs whole ({c['logits_gb']} GB of logits) | "
        f"{c['chunked']['peak_gb']} GB | {c['full']['peak_gb']} GB (mlxlocal, unchunked) | "
        f"{c['ratio_peak_gb']}× | lower |"
    )
    return rows
