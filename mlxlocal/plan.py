"""`mlxlocal plan`: will this recipe (or model) fit in memory, and what makes it fit.

The estimate comes from the model's config alone: mlx-lm builds the architecture lazily (MLX
arrays are not evaluated, so no weight is allocated or read) to give every parameter's shape,
and the recipe says what is quantized, trained and kept for the backward pass. The parts follow
how our engine allocates (mlxlocal/train): weights at their dtype or quantization, adapters and
their gradients and optimizer state in float32, one micro-batch's saved activations (every
block's, or only block inputs plus one recomputed block with gradient checkpointing), the
logits (whole, or ~6 slices with the chunked loss), and the process's own floor (Python, MLX,
the libraries), which `mx.get_peak_memory()` does not count. The activation and logit factors
were measured against `mx.get_peak_memory()` on real runs of the engine (tests/test_plan.py).

Preference objectives (DPO, ORPO, SimPO) train batches of 2 × batch_size rows (each pair's
chosen and rejected answers); DPO's reference scoring pass is a phase before training
(`objective_parts`), and training holds no second model.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MlxLocalError
from .recipe import Recipe, load_recipe

GiB = 2**30
# What a Python process with MLX, mlx-lm and transformers imported holds besides MLX's
# buffers (measured: 0.43 GB RSS for the tiny recipe, whose MLX peak is 0.02 GB).
PROCESS_FLOOR = int(0.45 * GiB)
# Saved activations per token and block, in elements, beyond the formula's named tensors:
# measured factors (see tests/test_plan.py for the runs they were checked on).
LOGIT_COPIES = 5  # unchunked loss: logits, log-softmax, its gradient and two temporaries
PAIR_LOGIT_COPIES = 4  # the preference losses: one fewer (measured, tests/test_plan.py)
CHUNK_SLICES = 6  # chunked loss: MLX allocates a few slices ahead (train/loss.py)
REFERENCE_LOGIT_COPIES = 3  # DPO's scoring pass: the logits, in float32, and log-softmax's
PREFILL_STEP = 2048  # mlx-lm's prompt processing chunk (generate_step's prefill_step_size)
SHIPPED_CONFIGS = "model_configs"  # package folder of the built-in recipes' models' configs


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    """Peak memory by part. `peak` is what MLX allocates; `total` adds the process floor."""

    title: str
    parts: list[Part]
    floor: int = PROCESS_FLOOR

    @property
    def peak(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def total(self) -> int:
        return self.peak + self.floor

    def lines(self) -> list[str]:
        rows = [(p.name, gib(p.bytes), p.note) for p in self.parts]
        rows += [
            ("MLX peak", gib(self.peak), ""),
            ("process floor", gib(self.floor), "Python, MLX and libraries"),
            ("total", gib(self.total), ""),
        ]
        width = max(len(r[0]) for r in rows)
        out = [self.title]
        for name, size, note in rows:
            out.append(f"  {name:<{width}}  {size:>9}  {note}".rstrip())
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "parts": {p.name: p.bytes for p in self.parts},
            "peak_bytes": self.peak,
            "floor_bytes": self.floor,
            "total_bytes": self.total,
        }


@dataclass
class Suggestion:
    changes: list[str]  # recipe overrides, key=value
    estimate: Estimate
    fits: bool


@dataclass
class Plan:
    estimate: Estimate
    budget: int | None = None
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.estimate.total <= self.budget

    def lines(self) -> list[str]:
        out = [*self.estimate.lines(), *self.notes]
        if self.budget is None:
            return out
        if self.fits:
            spare = gib(self.budget - self.estimate.total)
            return [*out, f"fits in {gib(self.budget)} ({spare} to spare)"]
        out.append(f"does not fit in {gib(self.budget)}; changes, each with its estimate:")
        width = max((len(" ".join(s.changes)) for s in self.suggestions), default=0)
        for s in self.suggestions:
            verdict = "fits" if s.fits else "does not fit"
            out.append(f"  {' '.join(s.changes):<{width}}  {gib(s.estimate.total):>9}  {verdict}")
        if not any(s.fits for s in self.suggestions):
            out.append("  none fits: choose a smaller model")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate.to_json(),
            "budget_bytes": self.budget,
            "fits": self.fits,
            "suggestions": [
                {"changes": s.changes, "total_bytes": s.estimate.total, "fits": s.fits}
                for s in self.suggestions
            ],
            "notes": self.notes,
        }


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_memory(text: str) -> int:
    """'16GB', '16G', '500MB' → bytes (binary units: a '16 GB' Mac has 16 GiB)."""
    from .checkpoint.shards import parse_size

    try:
        return parse_size(text.strip().removesuffix("iB").removesuffix("ib"))
    except MlxLocalError:
        raise MlxLocalError(
            f"--memory {text!r}: write an amount like 16GB, 24G or 8000MB"
        ) from None


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        raise MlxLocalError("cannot read this machine's memory: give --memory 16GB") from None


# --- the model's shapes, from its config ----------------------------------------------------------


def shipped_config(model: str) -> Path | None:
    """config.json mlxlocal ships for a built-in recipe's Hub model (offline planning)."""
    from .resources import builtin_dir

    path = builtin_dir(SHIPPED_CONFIGS) / (model.replace("/", "--") + ".json")
    return path if path.is_file() else None


def model_config(model: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """(config, where it was read) for a folder, a config.json, builtin:tiny, a cached Hub
    model or one whose config mlxlocal ships; never downloads."""
    from .checkpoint.inputs import read_json
    from .models import check_config, read_config
    from .sources import is_hub_id, resolve_source

    path = Path(model).expanduser()
    if path.is_file():
        config = read_json(path, "model config", "give a model's config.json")
        if not isinstance(config, dict) or "model_type" not in config:
            raise MlxLocalError(f"{model}: no model_type; this does not look like a model config")
        check_config(config)
        return config, str(path)
    if model.startswith("builtin:") or path.is_dir():
        folder = resolve_source(model, revision, download=False)
        return read_config(folder), str(folder)
    if not is_hub_id(model):
        raise MlxLocalError(
            f"{model}: unknown model; give a model folder, its config.json or a Hub id"
        )
    try:
        folder = resolve_source(model, revision, download=False)
        return read_config(folder), str(folder)
    except MlxLocalError:
        shipped = shipped_config(model)
        if shipped is None:
            raise MlxLocalError(
                f"{model}: unknown model: not in the Hugging Face cache and not one whose "
                "config mlxlocal ships; download it (`hf download "
                f"{model} config.json`) or give its config.json"
            ) from None
        config = read_json(shipped, "model config", "reinstall mlxlocal")
        return config, "the config shipped with mlxlocal"


_BLOCK = re.compile(r"(^|\.)layers\.(\d+)\.(.+)$")


@dataclass
class Linear:
    """A Linear or Embedding weight (out × in): what quantization replaces, LoRA adapts."""

    block: int | None  # block index, None outside the blocks
    path: str  # inside the block (or the model)
    inputs: int
    outputs: int


@dataclass
class Shape:
    """What the estimate needs from a config: parameter shapes and block dimensions."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    weights: list[Linear]  # every Linear/Embedding weight
    other: int  # elements of the remaining parameters (norms, biases)
    model: Any  # mlx-lm's module tree, lazy (for adapter targets)
    softcap: bool = False

    @property
    def parameters(self) -> int:
        return sum(w.inputs * w.outputs for w in self.weights) + self.other


def model_shape(config: dict[str, Any]) -> Shape:
    """Shapes of the model mlx-lm builds for `config`, without allocating its weights."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from .models import instantiate

    text = config.get("text_config") or config
    sizes = {}
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        value = text.get(key)
        if not isinstance(value, int) or value <= 0:
            raise MlxLocalError(
                f"config.json: {key} is missing or not a positive number; plan needs the "
                "model's sizes (a dense transformer's config)"
            )
        sizes[key] = value
    model = instantiate(config)  # lazy: nothing is evaluated
    if not getattr(model, "layers", None):
        raise MlxLocalError(f"{config['model_type']}: plan cannot find the model's blocks")
    weights = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            out, inp = m.weight.shape
            found = _BLOCK.search(path)
            if found:
                weights.append(Linear(int(found[2]), found[3], inp, out))
            else:
                weights.append(Linear(None, path, inp, out))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    heads = sizes["num_attention_heads"]
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or sizes["hidden_size"] // heads
    return Shape(
        model_type=config["model_type"],
        layers=len(model.layers),
        hidden=sizes["hidden_size"],
        intermediate=sizes["intermediate_size"],
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        vocab=sizes["vocab_size"],
        weights=weights,
        other=total - sum(w.inputs * w.outputs for w in weights),
        model=model,
        softcap=bool(text.get("final_logit_softcapping")),
    )


# --- training -----------------------------------------------------------------------------------


def dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


def _quantized_bytes(w: Linear, bits: int, group: int, scale_bytes: int) -> int:
    groups = math.ceil(w.inputs / group)
    return w.outputs * w.inputs * bits // 8 + 2 * w.outputs * groups * scale_bytes


def weight_bytes(
    shape: Shape, dtype: str, quantization: dict[str, Any] | None, keep: list[str]
) -> tuple[int, str]:
    """(bytes, note): the weights at `dtype`, their Linear/Embedding layers quantized as
    `quantization` says (bits, group_size; per-layer entries by path) except `keep`."""
    b = dtype_bytes(dtype)
    total = shape.other * b
    if not quantization:
        return total + sum(w.inputs * w.outputs for w in shape.weights) * b, dtype
    bits, group = quantization["bits"], quantization["group_size"]
    for w in shape.weights:
        full = w.path if w.block is None else f"model.layers.{w.block}.{w.path}"
        own = quantization.get(full, quantization.get(w.path))
        kept = w.block is None and w.path.rsplit(".", 1)[-1] in keep
        if own is False or kept:
            total += w.inputs * w.outputs * b
        elif isinstance(own, dict):
            total += _quantized_bytes(w, own["bits"], own["group_size"], b)
        else:
            total += _quantized_bytes(w, bits, group, b)
    return total, f"{bits}-bit (group {group}), the rest {dtype}"


def _optimizer_factor(recipe: Recipe) -> float:
    """Optimizer state per trainable element, in elements."""
    t = recipe.training
    if t.optimizer in ("adamw", "adam"):
        return 2.0
    if t.optimizer == "sgd":
        return 1.0 if t.optimizer_args.get("momentum", 0) else 0.0
    return 1.0 if t.optimizer_args.get("beta_1") else 0.05  # adafactor: factored rows + cols


def objective_parts(
    recipe: Recipe, shape: Shape, dtype: str, weights: int, peak: int
) -> list[Part]:
    """What a preference objective adds beyond its batches of 2 × batch_size rows: DPO's
    reference is scored once before training (train/preference.py) and only its scores are
    kept, so no second model is held, full fine-tuning included. Its scoring pass (the
    reference's weights and a no-gradient forward of one batch) is a phase of its own: the
    part is what it peaks above the training step, nothing when below (the usual case)."""
    m, t, d = recipe.method, recipe.training, recipe.data
    if m.objective != "dpo":
        return []
    folder = Path(m.reference)
    if m.reference != "base" and (folder / "config.json").exists():  # a model of its own
        from .checkpoint.inputs import read_json

        config = read_json(folder / "config.json", "config")
        shape = model_shape(config)
        weights, _ = weight_bytes(shape, dtype, config.get("quantization"), [])
    rows = 2 * t.batch_size
    logits = REFERENCE_LOGIT_COPIES * rows * (d.max_length - 1) * shape.vocab * 4
    scoring = weights + logits
    note = f"scores cached before training, no second model held; scoring pass {gib(scoring)}"
    return [Part("reference (DPO)", max(0, scoring - peak), note)]


def training_estimate(recipe: Recipe, config: dict[str, Any], dtype: str | None = None) -> Estimate:
    """Peak memory of `run` for `recipe` on the model `config` describes."""
    from .adapters.layers import adapter_keys, default_modules, resolve_layers
    from .checkpoint.dtypes import compute_dtype
    from .resources import family_spec

    shape = model_shape(config)
    m, t, d = recipe.method, recipe.training, recipe.data
    dtype = dtype or compute_dtype(recipe.model.dtype)
    b = dtype_bytes(dtype)
    q = config.get("quantization") or (
        recipe.model.quantize.model_dump() if recipe.model.quantize else None
    )
    keep = []
    if recipe.model.quantize is not None:
        spec = family_spec(shape.model_type) or {}
        keep = spec.get("keep_high_precision", ["embed_tokens", "lm_head"])
    weights, wnote = weight_bytes(shape, dtype, q, keep)
    parts = [Part("weights", weights, f"{shape.parameters / 1e6:,.0f}M parameters, {wnote}")]

    layers = resolve_layers(m.layers, shape.layers)
    if m.type == "full":
        outside = shape.other if m.layers == "all" else 0
        trained = outside + sum(
            w.inputs * w.outputs
            for w in shape.weights
            if w.block in layers or (w.block is None and m.layers == "all")
        )
        tbytes, adapted = b, []
    else:
        blocks = [shape.model.layers[i] for i in layers]
        keys = adapter_keys(blocks, m.modules or default_modules(shape.model_type))
        adapted = [w for w in shape.weights if w.block in layers and w.path in keys]
        trained = sum(m.rank * (w.inputs + w.outputs) for w in adapted)
        trained += sum(w.outputs for w in adapted) if m.type == "dora" else 0
        tbytes = 4  # adapters are created in float32
        parts.append(Part("adapters", trained * tbytes, f"{trained / 1e6:,.2f}M parameters"))
    grads = trained * tbytes * (2 if t.grad_accumulation > 1 else 1)
    parts.append(
        Part("gradients", grads, "+ the accumulated sum" if t.grad_accumulation > 1 else "")
    )
    parts.append(
        Part("optimizer state", int(trained * tbytes * _optimizer_factor(recipe)), t.optimizer)
    )

    pairs = m.objective != "sft"  # a batch of B pairs is 2B rows, chosen and rejected
    batch, length = t.batch_size * (2 if pairs else 1), d.max_length - 1
    tokens = batch * length
    rows = f"{t.batch_size} pairs = {batch} rows" if pairs else str(batch)
    active = shape.layers - min(layers)  # blocks the backward pass goes through
    block = _block_activations(shape, length, b)
    extra = _adapter_activations(adapted, b, m.type, m.rank, m.dropout)
    if t.grad_checkpoint:
        acts = tokens * (active * shape.hidden * b + block + extra // len(layers))
        note = "gradient checkpointing: block inputs + one block"
    else:
        acts = tokens * (active * block + extra)
        note = f"{active} blocks, no gradient checkpointing"
    parts.append(Part("activations", acts, f"{note}; {rows} × {d.max_length} tokens"))
    if t.loss_chunk_size:
        width = min(t.loss_chunk_size, length)
        logits = CHUNK_SLICES * batch * width * shape.vocab * 4
        note = f"chunked, {t.loss_chunk_size} positions a slice"
    else:
        copies = (PAIR_LOGIT_COPIES if pairs else LOGIT_COPIES) + (2 if shape.softcap else 0)
        logits = copies * tokens * shape.vocab * max(b, 4 if dtype == "float32" else b)
        note = f"whole: {batch} × {length} × {shape.vocab:,} vocabulary"
    parts.append(Part("logits and loss", logits, note))
    parts += objective_parts(recipe, shape, dtype, weights, sum(p.bytes for p in parts))
    method = m.type if m.type == "full" else f"{m.type} r{m.rank}" + (" (QLoRA)" if q else "")
    title = f"training {method}, {len(layers)} of {shape.layers} blocks, {dtype}"
    return Estimate(title, parts)


def _block_activations(shape: Shape, length: int, b: int) -> int:
    """Bytes one block saves per token for the backward pass.

    What its vector-Jacobian products read: the input and normalised input of the attention
    and of the MLP (4 × hidden), q/k/v after rotary embeddings and the attention output
    (2 × q + 2 × kv), the MLP's gate, up, activation and product (4 × intermediate), and the
    attention probabilities with part of the scores (1.5 × heads × length: fitted on the runs
    of tests/test_plan.py, between MLX keeping one and two of them).
    """
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return (8 * h + 4 * q + 4 * kv + 8 * i + 3 * shape.heads * length) * b // 2


def _adapter_activations(
    adapted: list[Linear], b: int, kind: str, rank: int, dropout: float
) -> int:
    """Bytes per token the adapters add: each LoRA layer's float32 update (out) and
    rank-wide product, dropout a copy of its input, DoRA its unscaled output."""
    extra = 0
    for w in adapted:
        extra += 4 * (w.outputs + rank)
        extra += w.inputs * b if dropout else 0
        extra += w.outputs * b if kind == "dora" else 0
    return extra


# --- inference ----------------------------------------------------------------------------------


def inference_estimate(
    config: dict[str, Any], context: int, batch: int, dtype: str | None = None
) -> Estimate:
    """Weights, the KV cache of `batch` sequences of `context` tokens, and one prompt chunk's
    logits and activations (mlx-lm processes prompts 2048 tokens at a time)."""
    from .models import source_dtype

    shape = model_shape(config)
    dtype = dtype or source_dtype(config) or "bfloat16"
    b = dtype_bytes(dtype)
    weights, wnote = weight_bytes(shape, dtype, config.get("quantization"), [])
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * context * batch * b
    chunk = min(PREFILL_STEP, context)
    logits = batch * chunk * shape.vocab * b
    acts = batch * chunk * (4 * shape.hidden + 3 * shape.intermediate) * b
    return Estimate(
        f"inference, {batch} × {context:,} tokens, {dtype}",
        [
            Part("weights", weights, f"{shape.parameters / 1e6:,.0f}M parameters, {wnote}"),
            Part("KV cache", kv, f"{shape.layers} layers × {shape.kv_heads} KV heads"),
            Part("prompt chunk", logits + acts, f"logits and activations of {chunk} tokens"),
        ],
    )


# --- plans --------------------------------------------------------------------------------------


def fit_changes(recipe: Recipe, quantized: bool) -> list[list[str]]:
    """Changes that lower the estimate, cheapest (for the result) first."""
    t, d = recipe.training, recipe.data
    changes: list[list[str]] = []
    if t.loss_chunk_size is None:
        changes.append(["training.loss_chunk_size=256"])
    elif t.loss_chunk_size > 64:
        changes.append([f"training.loss_chunk_size={t.loss_chunk_size // 4}"])
    if not t.grad_checkpoint:
        changes.append(["training.grad_checkpoint=true"])
    size = t.batch_size
    while size > 1:
        size //= 2
        accumulate = t.grad_accumulation * t.batch_size // size
        changes.append([f"training.batch_size={size}", f"training.grad_accumulation={accumulate}"])
    bits = recipe.model.quantize.bits if recipe.model.quantize else 16
    if recipe.method.type != "full" and not quantized:
        changes += [[f"model.quantize.bits={n}"] for n in (8, 4) if n < bits]
    length = d.max_length
    while length > 256:
        length //= 2
        changes.append([f"data.max_length={length}"])
    return changes


def measured_speed(run: Path) -> tuple[float, float] | None:
    """Tokens per optimizer step and tokens/s measured by an earlier run of the recipe on
    this machine (its metrics.jsonl), medians over its steps; None before any step."""
    from .train.checkpoints import RunDir

    runs = RunDir(run)
    if not runs.metrics.is_file():
        return None
    rows = [r for r in runs.records() if r.get("tokens_per_s") and r.get("tokens")]
    if not rows:
        return None
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return median([r["tokens"] for r in rows]), median([r["tokens_per_s"] for r in rows])


def time_note(recipe: Recipe, throughput: float | None) -> str | None:
    """Time per step from a measured throughput: `throughput` tokens/s if given (tokens per
    step then at most batch_size × grad_accumulation × max_length), else the recipe's own
    earlier run in its output directory."""
    t = recipe.training
    if throughput is not None:
        tokens, speed = t.batch_size * t.grad_accumulation * recipe.data.max_length, throughput
        source, bound = f"at {speed:,.0f} tokens/s (given)", "at most "
    else:
        measured = measured_speed(Path(recipe.output).expanduser())
        if measured is None:
            return None
        (tokens, speed), bound = measured, "~"
        source = f"at {speed:,.0f} tokens/s measured in {recipe.output}/metrics.jsonl"
    step = tokens / speed
    whole = f", {bound}{step * t.steps / 60:.1f} min for {t.steps} steps" if t.steps else ""
    return f"time: {bound}{step:.2f} s per step ({tokens:,.0f} tokens) {source}{whole}"


def plan_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    memory: int | None = None,
    dtype: str | None = None,
    throughput: float | None = None,
) -> Plan:
    """The estimate for a recipe; with `memory`, the changes that make it fit."""
    recipe = load_recipe(path, overrides)
    config, where = model_config(recipe.model.path, recipe.model.revision)
    estimate = training_estimate(recipe, config, dtype)
    notes = [f"model {recipe.model.path}: {config['model_type']}, config from {where}"]
    if recipe.data.packing:
        notes.append("packing: rows are filled to data.max_length, so every batch is full")
    timing = time_note(recipe, throughput)
    if timing:
        notes.append(timing)
    plan = Plan(estimate, memory, notes=notes)
    if memory is None or estimate.total <= memory:
        return plan
    applied: list[str] = []
    for change in fit_changes(recipe, "quantization" in config):
        single = training_estimate(load_recipe(path, [*overrides, *change]), config, dtype)
        plan.suggestions.append(Suggestion(change, single, single.total <= memory))
    if any(s.fits for s in plan.suggestions):
        return plan
    # No one change is enough: the cheapest together, in order, until the estimate fits.
    for change in fit_changes(recipe, "quantization" in config):
        keys = {c.split("=")[0] for c in change}
        applied = [a for a in applied if a.split("=")[0] not in keys] + change
        combined = training_estimate(load_recipe(path, [*overrides, *applied]), config, dtype)
        if combined.total <= memory:
            if len(applied) > len(change):
                plan.suggestions.append(Suggestion(list(applied), combined, True))
            break
    return plan


def plan_model(
    model: str,
    context: int,
    batch: int = 1,
    memory: int | None = None,
    dtype: str | None = None,
    revision: str | None = None,
) -> Plan:
    """The estimate for generating or serving with `model`: weights and KV cache."""
    config, where = model_config(model, revision)
    estimate = inference_estimate(config, context, batch, dtype)
    plan = Plan(
        estimate, memory, notes=[f"model {model}: {config['model_type']}, config from {where}"]
    )
    if memory is not None and estimate.total > memory:
        for n in (batch // 2, 1):
            if 1 <= n < batch:
                e = inference_estimate(config, context, n, dtype)
                plan.suggestions.append(Suggestion([f"--batch {n}"], e, e.total <= memory))
        c = context
        while c > 1024:
            c //= 2
            e = inference_estimate(config, c, batch, dtype)
            plan.suggestions.append(Suggestion([f"--context {c}"], e, e.total <= memory))
    return plan


def recipe_memory(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """A recipe's estimated total for `recipes list` ("?" when its model's config is not
    at hand)."""
    recipe = load_recipe(path, overrides)
    try:
        config, _ = model_config(recipe.model.path, recipe.model.revision)
    except MlxLocalError:
        return "?"
    e = training_estimate(recipe, config)
    return f"{e.total / GiB:.1f} GiB"


def memory_warning(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), memory: int | None = None
) -> str | None:
    """What `recipes validate` warns when the estimate exceeds `memory` (this machine's)."""
    recipe = load_recipe(path, overrides)
    try:
        config, _ = model_config(recipe.model.path, recipe.model.revision)
    except MlxLocalError:
        return None
    total, have = training_estimate(recipe, config).total, memory or machine_memory()
    if total <= have:
        return None
    return (
        f"the estimated peak memory {gib(total)} exceeds {gib(have)} of memory; "
        f"`mlxlocal plan {path}` lists changes that fit"
    )
