"""`quantize`: an MLX checkpoint that says what its quantization cost.

One path with `convert`: the source (Hugging Face or MLX) is opened as convert opens it and each
weight is quantized lazily just before its shard is written, so without text measurements peak
memory stays about one layer. With measurements the unquantized model is held once (for the
reference logits and per-layer sensitivity), then the written output is loaded back and measured.
The report lands in OUT/quantization_report.json before OUT is renamed into place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint.atomic import atomic_directory, check_output
from .checkpoint.dtypes import check_dtype
from .checkpoint.inputs import regular_file
from .checkpoint.jsonout import strict_dumps
from .checkpoint.shards import parse_size
from .convert import Source, load_weights, open_source, write_checkpoint
from .errors import MlxLocalError
from .info import info
from .models import load
from .quality import (
    compare,
    for_measuring,
    layer_sensitivity,
    load_tokenizer,
    logits,
    perplexity,
    token_parts,
)
from .quant_plan import (
    DEFAULT_KEEP_HIGH,
    Layer,
    Spec,
    allocate_bits,
    allocation_options,
    check_spec,
    default_spec,
    parse_rule,
    plan_layers,
    quantization_config,
    read_rules,
    rule_spec,
)
from .resources import family_spec

REPORT = "quantization_report.json"
DEFAULT_BITS = {"affine": 4, "mxfp4": 4, "mxfp8": 8, "nvfp4": 4}


@dataclass
class QuantizeResult:
    out: Path
    report: dict
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def quantize(
    src: str | Path,
    out: str | Path,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    mode: str = "affine",
    preset: str = "uniform",
    rules: list[str] | tuple[str, ...] = (),
    rules_file: str | Path | None = None,
    target_bpw: float | None = None,
    calib: str | Path | None = None,
    evaluate: bool = True,
    calib_tokens: int = 256,
    eval_tokens: int = 512,
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    revision: str | None = None,
    force: bool = False,
) -> QuantizeResult:
    """Quantize `src` (HF or unquantized MLX checkpoint, or Hub id) into an MLX checkpoint.

    `bits`/`group_size`/`mode` set the default; `preset` and `rules` ('PATTERN=BITS[/GROUP]',
    regex on module paths, first match wins; BITS 16 keeps a layer) override it per layer;
    `target_bpw` instead picks affine bits per layer to hit that average with the least
    measured damage. `calib` replaces the built-in text (its first half calibrates, its second
    half evaluates); `evaluate=False` skips perplexity/KL/top-1.
    """
    out = Path(out)
    check_output(out, force)
    check_dtype(dtype)
    max_shard = parse_size(shard_size)
    request = _check_request(bits, group_size, mode, preset, rules, rules_file, target_bpw, calib)
    source = open_source(src, revision)
    _refuse_quantized(source)
    windows = None
    if evaluate or target_bpw is not None:
        windows = token_parts(load_tokenizer(source.path), calib, calib_tokens, eval_tokens)

    with atomic_directory(out, force) as tmp:
        load_weights(source, tmp / ".staging", dtype)
        layers = _plan(source, request)
        size_before = sum(w.nbytes for w in source.weights.values())
        reference, damage = _measure(source, layers, request, windows, evaluate)
        shards, size_after, errors = _write(tmp, source, layers, request, max_shard)
        report = _report(
            src,
            tmp,
            source,
            request,
            sizes=(size_before, size_after),
            shards=len(shards),
            layers=[_layer_row(layer, errors, damage) for layer in layers],
            evaluation=_evaluate(tmp, windows[1], reference) if evaluate else None,
        )
        (tmp / REPORT).write_text(strict_dumps(report, indent=2))
    return QuantizeResult(out, report, source.notes, source.warnings)


@dataclass(frozen=True)
class _Request:
    """What the user asked for, checked before a tensor is read."""

    spec: Spec  # the default for every layer (with target_bpw: the mode and group size)
    rules: list[tuple[str, str]]
    preset: str
    target_bpw: float | None
    calib: str | Path | None

    def to_json(self, dtype: str) -> dict:
        return {
            "bits": None if self.target_bpw is not None else self.spec.bits,
            "group_size": self.spec.group_size,
            "mode": self.spec.mode,
            "preset": self.preset,
            "rules": [f"{p}={v}" for p, v in self.rules],
            "target_bpw": self.target_bpw,
            "text": str(self.calib) if self.calib else "built-in",
            "dtype": dtype,
        }


def _check_request(
    bits: int | None,
    group_size: int | None,
    mode: str,
    preset: str,
    rules: Sequence[str],
    rules_file: str | Path | None,
    target_bpw: float | None,
    calib: str | Path | None,
) -> _Request:
    if target_bpw is not None:
        if bits is not None:
            raise MlxLocalError("give --bits or --target-bpw, not both")
        if mode != "affine":
            raise MlxLocalError("--target-bpw mixes affine bit widths: use --mode affine")
    spec = check_spec(DEFAULT_BITS.get(mode, 4) if bits is None else bits, group_size, mode)
    rule_list = [parse_rule(r) for r in rules] + (read_rules(rules_file) if rules_file else [])
    for _, value in rule_list:
        rule_spec(value, spec)
    if calib is not None:
        regular_file(calib, "text file")  # before the model loads, not after
    return _Request(spec, rule_list, preset, target_bpw, calib)


def _plan(source: Source, request: _Request) -> list[Layer]:
    """Phase 1: each layer's quantization from the request, rules, preset and model family."""
    family = family_spec(source.config["model_type"]) or {}
    return plan_layers(
        source.model,
        request.spec,
        weights=source.weights,
        rules=request.rules,
        preset=request.preset,
        keep_high=tuple(family.get("keep_high_precision", DEFAULT_KEEP_HIGH)),
    )


def _measure(
    source: Source, layers: list[Layer], request: _Request, windows, evaluate: bool
) -> tuple[mx.array | None, dict[str, float]]:
    """Phase 2, on the unquantized model: the reference logits for the evaluation, and for
    `target_bpw` the bits chosen per layer (with each choice's measured KL)."""
    if windows is None:
        return None, {}
    # The model takes the tensors; it may cast them to float32 for measuring, and the output is
    # then written from those (the round trip is exact), never holding both.
    dtypes = {k: w.dtype for k, w in source.weights.items()}
    source.model.load_weights(list(source.weights.items()))
    source.weights = {}
    params = dict(tree_flatten(for_measuring(source.model).parameters()))
    source.weights = {k: params[k].astype(dtype) for k, dtype in dtypes.items()}
    reference = logits(source.model, windows[1]) if evaluate else None
    damage = {}
    if request.target_bpw is not None:
        damage = _allocate(source, layers, request.target_bpw, windows[0])
    return reference, damage


def _write(
    tmp: Path, source: Source, layers: list[Layer], request: _Request, max_shard: int
) -> tuple[list[str], int, dict[str, float]]:
    """Phase 3: each weight quantized lazily just before its shard is written; (shard names,
    bytes, each layer's relative weight error)."""
    default = default_spec(layers, None if request.target_bpw is not None else request.spec)
    source.config["quantization"] = quantization_config(layers, default)
    source.config["quantization_config"] = source.config["quantization"]
    lazy_errors = _quantize_lazily(source.weights, layers)
    errors: dict[str, float] = {}

    def record_error(name: str) -> None:
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and path in lazy_errors:
            errors[path] = lazy_errors.pop(path).item()

    shards, total = write_checkpoint(tmp, source, max_shard, after_write=record_error)
    source.model = None  # the unquantized model is no longer needed: free it
    mx.clear_cache()
    return shards, total, errors


def _report(
    src: str | Path,
    out: Path,
    source: Source,
    request: _Request,
    *,
    sizes: tuple[int, int],
    shards: int,
    layers: list[dict],
    evaluation: dict | None,
) -> dict:
    """Phase 4: what was asked, and what the checkpoint written to `out` holds and costs."""
    return {
        "source": str(src),
        "model_type": source.config["model_type"],
        "request": request.to_json(source.dtype),
        "requested_bits_per_weight": request.target_bpw or _nominal_bpw(request.spec, source.dtype),
        "bits_per_weight": info(out)["quantization"]["bits_per_weight"],
        "parameters": source.parameters,
        "size_before_bytes": sizes[0],
        "size_after_bytes": sizes[1],
        "shards": shards,
        "layers": layers,
        "eval": evaluation,
    }


def _refuse_quantized(source: Source) -> None:
    quant = source.config.get("quantization") or source.config.get("quantization_config")
    if quant:
        raise MlxLocalError(
            f"{source.name} is already quantized ({_describe(quant)}); quantize its "
            "full-precision source instead (or dequantize it first: mlx_lm convert --dequantize)"
        )


def _describe(quant: dict) -> str:
    if "bits" in quant:
        return f"{quant['bits']}-bit {quant.get('mode', 'affine')}"
    return str(quant.get("quant_method", "unknown method"))


def _nominal_bpw(spec: Spec, dtype: str) -> float:
    """Bits per weight of a uniform `spec` with scales (and affine biases) in `dtype`."""
    scale_bits = getattr(mx, dtype).size * 8 if spec.mode == "affine" else 8
    arrays = 2 if spec.mode == "affine" else 1
    return spec.bits + scale_bits * arrays / spec.group_size


def _allocate(source: Source, layers: list[Layer], target_bpw: float, windows) -> dict:
    """Measure each free layer's damage per option on the calibration text, then pick bits."""
    free = [layer for layer in layers if not layer.fixed and layer.spec is not None]
    # Bytes of everything the allocation does not choose: other tensors and fixed layers.
    rest = sum(w.nbytes for w in source.weights.values()) - sum(
        layer.nbytes(None) - (0 if layer in free else layer.nbytes(layer.spec)) for layer in layers
    )
    budget = target_bpw * source.parameters / 8 - rest
    low = sum(layer.nbytes(allocation_options(layer)[0]) for layer in free)
    high = sum(layer.nbytes(None) for layer in free)
    bpw = 8 / source.parameters
    if not free or not low <= budget < high:
        raise MlxLocalError(
            f"--target-bpw {target_bpw} is out of reach: this model (with its rules and preset) "
            f"spans {(rest + low) * bpw:.2f} (every free layer at 2 bits) to "
            f"{(rest + high) * bpw:.2f} bits per weight (unquantized); choose a target between"
        )
    reference = logits(source.model, windows)
    options = {layer.path: allocation_options(layer) for layer in free}
    damage = layer_sensitivity(source.model, options, windows, reference)
    allocate_bits(free, damage, budget)
    for layer in free:
        layer.why = "; ".join(filter(None, [layer.why, f"chosen for --target-bpw {target_bpw}"]))
    return {layer.path: damage[layer.path][options[layer.path].index(layer.spec)] for layer in free}


def _quantize_lazily(weights: dict[str, mx.array], layers: list[Layer]) -> dict[str, mx.array]:
    """Swap each planned weight for its lazy quantized arrays (weight, scales[, biases]) and
    return each layer's lazy relative error ||W - dequant(quant(W))|| / ||W||."""
    errors = {}
    for layer in layers:
        spec = layer.spec
        if spec is None:
            continue
        w = weights[f"{layer.path}.weight"]
        parts = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        for leaf, part in zip(("weight", "scales", "biases"), parts, strict=False):
            weights[f"{layer.path}.{leaf}"] = part
        errors[layer.path] = _relative_error(w, parts, spec)
    # The writer goes in dict order: keep a layer's arrays adjacent so each is held briefly.
    ordered = dict(sorted(weights.items()))
    weights.clear()
    weights.update(ordered)
    return errors


def _relative_error(w: mx.array, parts: list[mx.array], spec: Spec) -> mx.array:
    """||W - Ŵ|| / ||W|| on evenly spaced rows, at most ~2^18 weights: exact for small layers,
    within ~1 % for large ones, at a fraction of the cost of a full pass."""
    rows = math.prod(w.shape[:-1])
    step = max(1, rows * w.shape[-1] >> 18)
    w, *parts = (a.reshape(rows, a.shape[-1])[::step] for a in (w, *parts))
    biases = parts[2] if len(parts) == 3 else None
    # Dequantize in the weight's own dtype: asking MLX for float32 is ~5x slower on the CPU.
    restored = mx.dequantize(parts[0], parts[1], biases, spec.group_size, spec.bits, spec.mode)
    restored, w = restored.astype(mx.float32), w.astype(mx.float32)
    return mx.sqrt(mx.sum(mx.square(restored - w)) / mx.sum(mx.square(w)))


def _layer_row(layer: Layer, errors: dict[str, float], damage: dict[str, float]) -> dict:
    spec = layer.spec
    return {
        "path": layer.path,
        "params": layer.params,
        "bits": spec.bits if spec else layer.dtype_bytes * 8,
        "group_size": spec.group_size if spec else None,
        "mode": spec.mode if spec else "unquantized",
        "bytes": layer.nbytes(spec),
        "error": round(errors.get(layer.path, 0.0), 6),
        "kl": damage.get(layer.path),
        "note": layer.why,
    }


def _evaluate(out: Path, windows, reference) -> dict:
    model, _ = load(out)
    after = logits(for_measuring(model), windows)
    del model
    return {
        "tokens": sum(len(w) for w in windows),
        "perplexity_before": round(perplexity(reference, windows), 4),
        "perplexity_after": round(perplexity(after, windows), 4),
        **compare(reference, after),
    }


def format_report(report: dict, per_layer: bool = True) -> str:
    """The report as a summary and a per-layer table, for the terminal."""
    before, after = report["size_before_bytes"], report["size_after_bytes"]
    request = report["request"]
    asked = (
        f"target {request['target_bpw']}"
        if request["target_bpw"] is not None
        else f"{report['requested_bits_per_weight']:.3f} for a uniform {request['bits']}-bit "
        f"{request['mode']} g{request['group_size']}"
    )
    lines = [
        f"bits per weight   {report['bits_per_weight']:.3f} counted from the file ({asked})",
        f"size              {before / 1e6:.2f} MB → {after / 1e6:.2f} MB "
        f"({before / after:.2f}× smaller)",
    ]
    ev = report["eval"]
    if ev:
        lines += [
            f"perplexity        {ev['perplexity_before']:.3f} → {ev['perplexity_after']:.3f} "
            f"({ev['tokens']} tokens of {request['text']} text)",
            f"vs unquantized    mean KL {ev['mean_kl']:.3g} nats/token, "
            f"top-1 agreement {ev['top1_agreement']:.1%}",
        ]
    else:
        lines.append("perplexity, KL    not measured (--no-eval)")
    if not per_layer:
        return "\n".join(lines)
    rows = [("layer", "params", "quantization", "rel. error", "KL alone", "note")]
    for row in report["layers"]:
        quant = (
            f"{row['bits']}-bit {row['mode']} g{row['group_size']}"
            if row["group_size"]
            else f"{row['bits']}-bit (unquantized)"
        )
        kl = f"{row['kl']:.3g}" if row["kl"] is not None else ""
        error = f"{row['error']:.4f}"
        rows.append((row["path"], f"{row['params']:,}", quant, error, kl, row["note"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines + [""] + [t.rstrip() for t in table])
