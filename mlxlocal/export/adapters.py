"""Adapters in memory: one form for mlx-lm's layout and PEFT's, and the one way to fuse them.

mlx-lm's layout (`adapters.safetensors` + `adapter_config.json`) stores per module `lora_a`
(in, r), `lora_b` (r, out) and, for DoRA, the magnitude `m` (out,); the update is
W + scale · lora_bᵀ·lora_aᵀ. `scale` is what the layers use; `alpha`/`rslora` are kept only so
that PEFT's `lora_alpha` survives a round trip bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..checkpoint.files import weight_files
from ..checkpoint.safetensors import load_lazy, read_header
from ..errors import MlxLocalError

LEAVES = ("lora_a", "lora_b", "m")


@dataclass
class Adapter:
    kind: str  # "lora" | "dora"
    rank: int
    scale: float
    modules: dict[str, dict[str, mx.array]]  # "model.layers.3.self_attn.q_proj" → leaves
    dropout: float = 0.0
    rslora: bool = False
    alpha: float | None = None  # PEFT's lora_alpha, when known exactly
    targets: list[str] = field(default_factory=list)  # PEFT's target_modules, when read

    @property
    def lora_alpha(self) -> float:
        """PEFT's lora_alpha for this scale (scale = alpha/r, or alpha/√r with rsLoRA)."""
        if self.alpha is not None:
            return self.alpha
        return self.scale * (math.sqrt(self.rank) if self.rslora else self.rank)


def is_peft_dir(path: Path) -> bool:
    return (Path(path) / "adapter_model.safetensors").exists() or (
        Path(path) / "adapter_model.bin"
    ).exists()


def load_adapter(path: str | Path) -> Adapter:
    """An adapter directory in mlx-lm's layout, or a PEFT directory."""
    path = Path(path)
    if is_peft_dir(path):
        from .peft import read_peft

        return read_peft(path)
    config = read_json(path / "adapter_config.json")
    weights_file = path / "adapters.safetensors"
    if not weights_file.exists():
        raise MlxLocalError(f"{path}: no adapters.safetensors; is this an adapter directory?")
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise MlxLocalError(
            f"{path}: fine_tune_type {kind!r} is not an adapter (a full fine-tune saves whole "
            "weights); only LoRA and DoRA adapters can be fused or exported"
        )
    params = config.get("lora_parameters") or {}
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in load_lazy(weights_file).items():
        module, _, leaf = key.rpartition(".")
        if leaf not in LEAVES:
            raise MlxLocalError(f"{weights_file}: unexpected tensor {key}; not a LoRA/DoRA adapter")
        modules.setdefault(module, {})[leaf] = value
    if not modules:
        raise MlxLocalError(f"{weights_file}: holds no adapter tensors")
    ranks = {m["lora_a"].shape[1] for m in modules.values() if "lora_a" in m}
    for name, leaves in modules.items():
        if "lora_a" not in leaves or "lora_b" not in leaves or (kind == "dora") != ("m" in leaves):
            raise MlxLocalError(f"{weights_file}: module {name} lacks some {kind} tensors")
    if len(ranks) != 1:
        raise MlxLocalError(f"{weights_file}: modules have different ranks {sorted(ranks)}")
    if "scale" not in params:
        raise MlxLocalError(f"{path}/adapter_config.json: lora_parameters has no scale")
    return Adapter(
        kind=kind,
        rank=ranks.pop(),
        scale=float(params["scale"]),
        modules=modules,
        dropout=float(params.get("dropout", 0.0)),
        rslora=bool(params.get("rslora", False)),
        alpha=params.get("alpha"),
    )


def read_json(path: Path) -> dict:
    if not path.exists():
        raise MlxLocalError(f"{path.parent}: no {path.name}; is this an adapter directory?")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxLocalError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise MlxLocalError(f"{path}: not a JSON object")
    return data


def fuse(weight: mx.array, leaves: dict[str, mx.array], adapter: Adapter) -> mx.array:
    """The adapted weight (out, in) in float32, as mlx-lm's LoRA/DoRA layers compute it."""
    w = weight.astype(mx.float32)
    a, b = leaves["lora_a"].astype(mx.float32), leaves["lora_b"].astype(mx.float32)
    if a.shape[0] != w.shape[1] or b.shape[1] != w.shape[0]:
        raise MlxLocalError(
            f"adapter shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit a weight of shape "
            f"{tuple(w.shape)}; was the adapter trained on this model?"
        )
    w = w + (adapter.scale * b.T) @ a.T
    if adapter.kind == "dora":
        w = (leaves["m"].astype(mx.float32) / mx.linalg.norm(w, axis=1))[:, None] * w
    return w


def check_fits(adapter: Adapter, shapes: dict[str, tuple[int, int]], model: Path) -> None:
    """Refuse an adapter whose modules or shapes do not belong to the model's linear layers."""
    for name, leaves in adapter.modules.items():
        if name not in shapes:
            raise MlxLocalError(
                f"the adapter targets {name}, which {model} does not have as a linear layer; "
                "is the adapter for another architecture?"
            )
        out_dim, in_dim = shapes[name]
        a, b = leaves["lora_a"], leaves["lora_b"]
        if tuple(a.shape) != (in_dim, adapter.rank) or tuple(b.shape) != (adapter.rank, out_dim):
            raise MlxLocalError(
                f"the adapter's {name} has shapes {tuple(a.shape)}/{tuple(b.shape)} but the "
                f"model's layer is {out_dim}×{in_dim}; is the adapter for another model size?"
            )


def linear_shapes(model: Path, config: dict) -> dict[str, tuple[int, int]]:
    """Module name → (out, in) of every linear layer in an MLX checkpoint, from headers only."""
    header: dict[str, dict] = {}
    for f in weight_files(Path(model))[1]:
        header.update(read_header(f)[0])
    quant = config.get("quantization") or {}
    shapes = {}
    for key, entry in header.items():
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or len(entry["shape"]) != 2 or module.endswith("embed_tokens"):
            continue
        out_dim, in_dim = entry["shape"]
        if f"{module}.scales" in header:
            bits = (quant.get(module) if isinstance(quant.get(module), dict) else quant)["bits"]
            in_dim = in_dim * 32 // bits
        shapes[module] = (out_dim, in_dim)
    return shapes
