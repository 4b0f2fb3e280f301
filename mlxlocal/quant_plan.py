"""What each layer of a model is quantized to: requests, rules, presets, group-size fallback,
sizes, the bit allocation for a target bits-per-weight, and mlx-lm's `quantization` config block.

Nothing here touches tensor data: a plan is made from module paths and shapes alone.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from .checkpoint.inputs import load_yaml, read_text
from .errors import MlxLocalError

# mode → (bits it takes, group sizes it takes, default group size), as MLX 0.32 supports them.
MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 64),
    "mxfp4": ((4,), (32,), 32),
    "mxfp8": ((8,), (32,), 32),
    "nvfp4": ((4,), (16,), 16),
}
KEEP = 16  # a rule's BITS meaning "leave this layer unquantized"
PRESETS = {
    "uniform": "every layer at --bits",
    "keep-embeddings": "the family's keep_high_precision layers (embeddings, output head) "
    "at higher precision",
    "mixed": "keep-embeddings plus v_proj/down_proj in the first and last eighth of the layers "
    "and every third layer between (llama.cpp Q4_K_M style) at higher precision",
}
# Projections that llama.cpp's K-quant mixes and mlx-lm's mixed recipes give more bits
# (Phi-3 fuses v_proj into qkv_proj).
SENSITIVE = ("v_proj", "qkv_proj", "down_proj")
DEFAULT_KEEP_HIGH = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class Spec:
    """One layer's quantization, as mlx-lm's `to_quantized` takes it."""

    bits: int
    group_size: int
    mode: str = "affine"

    def config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def __str__(self) -> str:
        return f"{self.bits}-bit {self.mode} g{self.group_size}"


@dataclass
class Layer:
    """A quantizable module: its path and weight shape, and what the plan gives it."""

    path: str
    shape: tuple[int, ...]
    dtype_bytes: int
    spec: Spec | None  # None: kept at full precision
    fixed: bool = False  # set by a rule, preset or the model: a bit allocation leaves it alone
    why: str = ""

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, spec: Spec | None) -> int:
        """Bytes on disk of this layer's weight (+ scales, biases) under `spec`."""
        if spec is None:
            return self.params * self.dtype_bytes
        scale_bytes = self.dtype_bytes if spec.mode == "affine" else 1
        arrays = 2 if spec.mode == "affine" else 1
        return self.params * spec.bits // 8 + self.params // spec.group_size * scale_bytes * arrays


def check_spec(bits: int, group_size: int | None, mode: str) -> Spec:
    """The Spec for a request, or a one-line error naming what the mode takes."""
    if mode not in MODES:
        raise MlxLocalError(f"unknown quantization mode {mode!r}: use one of {', '.join(MODES)}")
    allowed_bits, allowed_groups, default_group = MODES[mode]
    group_size = group_size or default_group
    if bits not in allowed_bits:
        raise MlxLocalError(
            f"{mode} quantization takes {_either(allowed_bits)} bits, not {bits}"
            + ("; use --mode affine for other widths" if mode != "affine" else "")
        )
    if group_size not in allowed_groups:
        raise MlxLocalError(
            f"{mode} quantization takes group size {_either(allowed_groups)}, not {group_size}"
        )
    return Spec(bits, group_size, mode)


def _either(values: tuple[int, ...]) -> str:
    words = [str(v) for v in values]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def higher(spec: Spec) -> Spec | None:
    """The 'higher precision' a preset gives a layer: 6 or 8 bits, fp8 for fp4, else unquantized."""
    if spec.mode in ("mxfp4", "nvfp4"):
        return Spec(8, 32, "mxfp8")
    if spec.mode == "mxfp8" or spec.bits == 8:
        return None
    return Spec(6 if spec.bits <= 4 else 8, spec.group_size)


def parse_rule(text: str) -> tuple[str, str]:
    """'PATTERN=BITS[/GROUP]' → (pattern, value), checked for a valid regex."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value.strip():
        raise MlxLocalError(
            f"cannot read rule {text!r}: write PATTERN=BITS[/GROUP], e.g. 'lm_head=8' or "
            "'layers\\.0\\.=6/32'"
        )
    return _pattern(pattern), value.strip()


def _pattern(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise MlxLocalError(f"rule pattern {pattern!r} is not a regular expression ({e})") from e
    return pattern


def read_rules(path: str | Path) -> list[tuple[str, str]]:
    """Rules from a YAML mapping of PATTERN: BITS[/GROUP], in file order."""
    data, _ = load_yaml(read_text(path, "rules file"), str(path), "rules files")
    if not isinstance(data, dict) or not data:
        raise MlxLocalError(
            f"{path}: a rules file is a YAML mapping of PATTERN: BITS[/GROUP], "
            "e.g. `lm_head: 8` on one line"
        )
    return [(_pattern(str(k)), str(v)) for k, v in data.items()]


def rule_spec(value: str, request: Spec) -> Spec | None:
    """BITS[/GROUP] in the request's mode when it takes those bits, else affine; 16 keeps."""
    m = re.fullmatch(r"(\d+)(?:/(\d+))?", value)
    if not m:
        raise MlxLocalError(
            f"rule value {value!r} is not BITS[/GROUP]: e.g. 8, 6/32, or {KEEP} to keep a layer "
            "unquantized"
        )
    bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if bits == KEEP:
        return None
    if bits in MODES[request.mode][0] and group in (None, request.group_size):
        return replace(request, bits=bits)
    default_group = request.group_size if request.mode == "affine" else MODES["affine"][2]
    return check_spec(bits, group or default_group, "affine")


def fit(spec: Spec, width: int) -> tuple[Spec | None, str]:
    """The spec adjusted to a layer's width: the largest group size that divides it, or none.

    mlx-lm leaves such layers silently at full precision; here it is chosen and said.
    """
    if width % spec.group_size == 0:
        return spec, ""
    if spec.mode == "affine":
        for g in sorted(MODES["affine"][1], reverse=True):
            if g < spec.group_size and width % g == 0:
                return replace(spec, group_size=g), (
                    f"width {width} is not a multiple of {spec.group_size}: group size {g}"
                )
    return None, (
        f"width {width} is not a multiple of the {spec.mode} group size {spec.group_size}: "
        "kept at full precision"
    )


def plan_layers(
    model,
    request: Spec,
    *,
    weights: dict,
    rules: list[tuple[str, str]] = (),
    preset: str = "uniform",
    keep_high: tuple[str, ...] = DEFAULT_KEEP_HIGH,
) -> list[Layer]:
    """Every quantizable module of `model` with the spec that rules, preset and request give it.

    First matching rule wins; then a spec the model itself asks for (mlx-lm's
    `quant_predicate`); then the preset; then the request. `weights` gives the dtypes.
    """
    if preset not in PRESETS:
        raise MlxLocalError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    own = getattr(model, "quant_predicate", None)
    n_layers = len(getattr(model, "layers", ()))
    used_rules: set[str] = set()
    layers = []
    for path, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if not hasattr(module, "to_quantized") or "weight" not in module:
            continue
        asked = own(path, module) if own else True
        if asked is False:
            continue
        w = weights[f"{path}.weight"]
        layer = Layer(path, tuple(w.shape), w.dtype.size, request)
        rule = next((r for r in rules if re.search(r[0], path)), None)
        if rule:
            used_rules.add(rule[0])
            layer.spec, layer.why = rule_spec(rule[1], request), f"rule {rule[0]}"
        elif isinstance(asked, dict):
            layer.spec, layer.why = Spec(**asked), "the model's own choice"
        elif _preset_wants_higher(preset, path, n_layers, keep_high):
            layer.spec, layer.why = higher(request), f"preset {preset}"
        layer.fixed = bool(layer.why)
        if layer.spec is not None:
            layer.spec, note = fit(layer.spec, layer.width)
            layer.why = "; ".join(filter(None, [layer.why, note]))
        layers.append(layer)
    if not layers:
        raise MlxLocalError("this model has no layers that MLX can quantize")
    unused = [r for r, _ in rules if r not in used_rules]
    if unused:
        raise MlxLocalError(
            f"rule {unused[0]!r} matches no quantizable layer; paths look like "
            f"{next((x.path for x in layers if '.layers.' in x.path), layers[0].path)!r}"
        )
    if not any(layer.width % request.group_size == 0 for layer in layers):
        widths = sorted({layer.width for layer in layers})
        raise MlxLocalError(
            f"group size {request.group_size} divides no layer width ({', '.join(map(str, widths))}"
            "): choose a smaller --group-size"
        )
    return layers


def _preset_wants_higher(preset: str, path: str, n_layers: int, keep_high: tuple[str, ...]):
    if preset == "uniform":
        return False
    name = path.rsplit(".", 1)[-1]
    if name in keep_high:
        return True
    if preset != "mixed" or name not in SENSITIVE:
        return False
    m = re.search(r"layers\.(\d+)\.", path)
    i, eighth = (int(m.group(1)) if m else 0), n_layers // 8
    return i < eighth or i >= 7 * n_layers // 8 or (i - eighth) % 3 == 2


def allocation_options(layer: Layer) -> list[Spec | None]:
    """What `allocate_bits` may give a free layer: each affine width at its (fitted) group size,
    or full precision."""
    return [Spec(b, layer.spec.group_size) for b in MODES["affine"][0]] + [None]


def allocate_bits(
    free: list[Layer],
    damage: dict[str, list[float]],
    budget_bytes: float,
) -> None:
    """Give each free layer the option that spends the byte budget with the least total damage.

    `damage[path][i]` is the measured cost of `allocation_options(layer)[i]`, assumed additive
    over layers. Greedy: start every layer at its smallest option, then repeatedly take the
    upgrade that saves the most damage per extra byte and still fits, until none fits.
    """
    options = {layer.path: allocation_options(layer) for layer in free}
    sizes = {layer.path: [layer.nbytes(o) for o in options[layer.path]] for layer in free}
    # More bits never hurt in expectation: smooth out measurement noise so gains are >= 0.
    costs = {p: list(_running_min(damage[p])) for p in options}
    choice = {p: 0 for p in options}
    used = sum(sizes[p][0] for p in options)
    while True:
        best = None
        for p, i in choice.items():
            for j in range(i + 1, len(options[p])):
                extra = sizes[p][j] - sizes[p][i]
                if extra <= 0 or used + extra > budget_bytes:
                    continue
                score = (costs[p][i] - costs[p][j]) / extra
                if best is None or score > best[0]:
                    best = (score, p, j, extra)
        if best is None:
            break
        _, p, j, extra = best
        choice[p], used = j, used + extra
    for layer in free:
        layer.spec = options[layer.path][choice[layer.path]]


def _running_min(values: list[float]):
    low = math.inf
    for v in values:
        low = min(low, v)
        yield low


def default_spec(layers: list[Layer], request: Spec | None) -> Spec:
    """The top-level spec of the config block: the request, else the most used by parameters."""
    if request is not None:
        return request
    counts = Counter()
    for layer in layers:
        if layer.spec is not None:
            counts[layer.spec] += layer.params
    return counts.most_common(1)[0][0] if counts else Spec(4, 64)


def quantization_config(layers: list[Layer], default: Spec) -> dict:
    """mlx-lm's `quantization` block: the default plus an entry for every layer that differs
    (`false` for a layer kept at full precision), so `mlx_lm.load` rebuilds each one exactly."""
    block: dict = default.config()
    for layer in layers:
        if layer.spec != default:
            block[layer.path] = layer.spec.config() if layer.spec else False
    return block
