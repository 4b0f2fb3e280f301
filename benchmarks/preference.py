"""preference: DPO trained pairs/s and peak memory, with the reference cached vs recomputed.

Same model (Llama-shaped, fp32, built by the train suite's builder), generated pairs (a prompt of
~40–200 tokens, answers of ~10–80), LoRA rank 8 on every linear layer, AdamW, batch 4 pairs,
the compiled training step of `mlxlocal run`. "cached" is what `run` does: the base's scores
of every pair are computed once before training (timed apart, `scoring_s`); "recompute" scores
the reference every step with the adapters switched off (`preference.adapters_off`), inside the
step's graph under stop_gradient, as trainers without a cache do (TRL's
`precompute_ref_log_probs=False`). Each contender runs in its own child process, alternately
A/B/A/B; the first step (compilation) is not timed.

Target (issue 18): cached ≤ 0.6× the time per step of recompute. The bound: a LoRA step is a
forward plus a backward through every block for the inputs' gradients (about one more forward;
the adapters' own gradients are small), so ~2 forwards against ~3 with the reference's:
≥ ~0.67×. `bound` is that ratio from the measured step and the reference's forward timed alone
as "recompute" runs it (a third child, "forward"); `backward_per_forward` is what the step spends
beyond that forward, per forward. With adapters on the top half of the blocks only ("@top", as
mlx-lm adapts the last 16 blocks of deeper models), the backward stops halfway down: ~1.5
forwards against ~2.5, and the bound is ~0.6×.
"""

from __future__ import annotations

import json
import statistics
import sys
from importlib.util import find_spec
from pathlib import Path

from .common import alternate, measure
from .train import MODULES, _model

SIZES = {  # hidden, layers, vocab, pairs, steps
    "smoke": (64, 2, 1024, 8, 2),  # the code path only (CI)
    "tiny": (256, 4, 8192, 64, 16),
    "small": (512, 8, 32000, 64, 16),
    "medium": (1024, 12, 32000, 64, 16),
}
PAIRS = """
import json, sys, time
import mlx.core as mx, mlx.optimizers as optim, numpy as np
from mlxlocal.data import Example, Pair

path, mode, pairs_n, steps, vocab, out = sys.argv[1:7]
pairs_n, steps, vocab = int(pairs_n), int(steps), int(vocab)
rng = np.random.default_rng(0)
def example(prompt, n):
    answer = rng.integers(3, vocab, n).tolist()
    return Example(prompt + answer, [0] * len(prompt) + [1] * n)
pairs = []
for _ in range(pairs_n):
    prompt = rng.integers(3, vocab, int(rng.integers(40, 200))).tolist()
    pairs.append(Pair(example(prompt, int(rng.integers(10, 80))),
                      example(prompt, int(rng.integers(10, 80)))))
"""
DRIVER = (
    PAIRS
    + """
from mlxlocal.adapters.layers import add_adapters
from mlxlocal.models import load
from mlxlocal.train.batches import iterate_pair_batches
from mlxlocal.train.preference import (
    Objective, adapters_off, reference_logps, sequence_logps, with_reference)
from mlxlocal.train.trainer import make_step
model, _ = load(path)
mx.eval(model.parameters())
mode, _, part = mode.partition("@")  # "@top": adapters on the top half of the blocks only
start = time.perf_counter()
cache = reference_logps(model, pairs, 4, 512) if mode == "cached" else None
scoring = time.perf_counter() - start
keys = json.loads(sys.argv[7])
blocks = len(model.layers)
add_adapters(model, "lora", 8, 2.0, 0.0, keys, list(range(blocks // 2 if part else 0, blocks)))
opt = optim.AdamW(learning_rate=1e-4)
opt.init(model.trainable_parameters())
step = make_step(model, opt, objective=Objective("dpo"))
state = [model.state, opt.state, mx.random.state]
def stream():
    epoch = 0
    while True:
        yield from iterate_pair_batches(pairs, 4, 512, 0, epoch)
        epoch += 1
batches = stream()
def train_one():
    b = next(batches)
    if mode == "forward":  # the reference's forward alone, as "recompute" runs it in its step
        with adapters_off(model):
            ref, _ = sequence_logps(model, b.tokens, b.weights)
        mx.eval(ref)
        return
    if cache is None:  # the reference's forward in the step's graph, adapters off, no gradient
        with adapters_off(model):
            ref, _ = sequence_logps(model, b.tokens, b.weights)
        b.reference = mx.stop_gradient(ref)
    else:
        b = with_reference(b, cache)
    loss, *_ = step([b])
    mx.eval(state, loss)
train_one()  # compiles the step: not timed
start = time.perf_counter()
for _ in range(steps):
    train_one()
seconds = time.perf_counter() - start
record = {"seconds": seconds, "scoring_s": scoring, "peak_gb": mx.get_peak_memory() / 1e9}
json.dump(record, open(out, "w"))
"""
)


# mlx-lm-lora's DPO (its trainer's own loop, from the package index: `pip install mlxlocal[bench]`)
# on the same model, pairs and settings: LoRA rank 8 scale 2 on the same layers, AdamW 1e-4,
# batch 4 pairs, β 0.1, sigmoid loss. Its reference is a second copy of the model, scored every
# step inside its compiled step. The first step (compilation) is not timed: the time runs from
# its first step report to its last (a report after every step, evaluation and saving off).
# Its trainers set a wired limit from `mx.device_info()["max_recommended_working_set_size"]`,
# which MLX's CPU back end does not report (KeyError): there the driver supplies 0 (no limit).
PEER_DRIVER = (
    PAIRS
    + """
from pathlib import Path
from mlx_lm import load
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo
keys = json.loads(sys.argv[7])
dataset = [{"chosen": p.chosen.tokens, "rejected": p.rejected.tokens} for p in pairs]
model, _ = load(path)
reference, _ = load(path)
model.freeze()
lora = {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": keys}
linear_to_lora_layers(model, len(model.layers), lora)
class Clock(TrainingCallback):
    times = []
    def on_train_loss_report(self, info):
        self.times.append(time.perf_counter())
clock = Clock()
args = DPOTrainingArgs(
    batch_size=4, iters=steps + 1, steps_per_report=1, steps_per_eval=10**9,
    steps_per_save=10**9, max_seq_length=512, beta=0.1,
    adapter_file=str(Path(out).with_suffix(".safetensors")))
info = mx.device_info()
if "max_recommended_working_set_size" not in info:  # absent on MLX's CPU back end
    mx.device_info = lambda: {**info, "max_recommended_working_set_size": 0}
train_dpo(model, reference, optim.AdamW(learning_rate=1e-4), dataset, None, args,
          training_callback=clock, loss_type="sigmoid")
seconds = clock.times[-1] - clock.times[0]
json.dump({"seconds": seconds, "peak_gb": mx.get_peak_memory() / 1e9}, open(out, "w"))
"""
)


def run(size: str, reps: int, work: Path) -> dict:
    hidden, layers, vocab, pairs, steps = SIZES[size]
    model = _model(work, hidden, layers, vocab)
    keys = json.dumps([f"self_attn.{m}" for m in MODULES[:4]] + [f"mlp.{m}" for m in MODULES[4:]])
    results: dict[str, list[dict]] = {"cached": [], "recompute": [], "forward": []}
    if size != "smoke":  # the same with adapters on the top half of the blocks only
        results |= {"cached@top": [], "recompute@top": []}
    peer = find_spec("mlx_lm_lora") is not None
    if peer:
        results["mlx-lm-lora"] = []

    def contender(mode: str):
        def once():
            out = work / f"preference-{mode}.json"
            driver = PEER_DRIVER if mode == "mlx-lm-lora" else DRIVER
            cmd = [sys.executable, "-c", driver, str(model), mode, str(pairs), str(steps)]
            run_ = measure([*cmd, str(vocab), str(out), keys])
            record = json.loads(out.read_text()) | {"rss_mb": run_.peak_rss_mb}
            results[mode].append(record)
            return run_

        return once

    alternate({mode: contender(mode) for mode in results}, reps)
    summary: dict = {}
    for mode, records in results.items():
        seconds = statistics.median(r["seconds"] for r in records)
        summary[mode] = {
            "seconds_per_step": seconds / steps,
            "pairs_per_s": steps * 4 / seconds,
            "peak_gb": statistics.median(r["peak_gb"] for r in records),
        }
    cached, recompute = summary["cached"], summary["recompute"]
    forward = summary.pop("forward")["seconds_per_step"]  # one batch's reference forward
    if "cached@top" in summary:
        top = summary["cached@top"]["seconds_per_step"]
        summary["top_half"] = {
            "ratio": top / summary["recompute@top"]["seconds_per_step"],
            "bound": top / (top + forward),
        }
    scoring = statistics.median(r["scoring_s"] for r in results["cached"])
    epoch = pairs / 4  # steps in one epoch
    summary |= {
        "ratio": cached["seconds_per_step"] / recompute["seconds_per_step"],
        "scoring_s": scoring,
        # One epoch with the one-off scoring counted: each pair's reference is computed once
        # either way, so this is ~1 by construction; later epochs gain the per-step ratio.
        "epoch_ratio": (scoring + epoch * cached["seconds_per_step"])
        / (epoch * recompute["seconds_per_step"]),
        # The best a cache can do: a step without the reference's forward vs one with it.
        "bound": cached["seconds_per_step"] / (cached["seconds_per_step"] + forward),
        # The step's backward against its forward (≥ 1 when every layer is adapted: the inputs'
        # gradients cost a forward): the bound is (1 + this) / (2 + this).
        "backward_per_forward": cached["seconds_per_step"] / forward - 1,
    }
    if peer:
        theirs = summary["mlx-lm-lora"]
        summary["peer_ratio"] = {
            "pairs_per_s": cached["pairs_per_s"] / theirs["pairs_per_s"],
            "peak_gb": cached["peak_gb"] / theirs["peak_gb"],
        }
    else:
        summary["mlx-lm-lora"] = "not installed (pip install mlxlocal[bench])"
    return {"size": size, "steps": steps, "pairs": pairs, **summary}


def table(result: dict) -> list[str]:
    c, r = result["cached"], result["recompute"]
    theirs = result["mlx-lm-lora"]
    peer, top = [], _top_half_row(result)
    if isinstance(theirs, dict):
        ratio = result["peer_ratio"]
        peer = [
            f"| DPO pairs/s vs mlx-lm-lora (its reference a second model, every step) | "
            f"{c['pairs_per_s']:.1f} | {theirs['pairs_per_s']:.1f} | "
            f"{ratio['pairs_per_s']:.2f}× | ≥ 1× |",
            f"| DPO peak memory GB (MLX) vs mlx-lm-lora | {c['peak_gb']:.2f} | "
            f"{theirs['peak_gb']:.2f} | {ratio['peak_gb']:.2f}× | ≤ 1× |",
        ]
    rows = [
        f"| DPO pairs/s, cached reference vs recomputed | {c['pairs_per_s']:.1f} | "
        f"{r['pairs_per_s']:.1f} | {result['ratio']:.2f}× time per step (bound "
        f"{result['bound']:.2f}×: the step's backward costs {result['backward_per_forward']:.2f} "
        f"forwards; first epoch with the scoring {result['epoch_ratio']:.2f}×) "
        "| ≤ 0.60× |",
        f"| DPO peak memory GB (MLX), cached vs recomputed | {c['peak_gb']:.2f} | "
        f"{r['peak_gb']:.2f} | | |",
    ]
    return peer + rows + top


def _top_half_row(result: dict) -> list[str]:
    if "top_half" not in result:
        return []
    c, r, t = result["cached@top"], result["recompute@top"], result["top_half"]
    return [
        f"| the same, LoRA on the top half of the blocks only | {c['pairs_per_s']:.1f} | "
        f"{r['pairs_per_s']:.1f} | {t['ratio']:.2f}× time per step (bound {t['bound']:.2f}×) "
        "| ≤ 0.60× |"
    ]
