"""Adapter folders in mlx-lm's layout, and the one `adapter_config.json` layout.

A folder holds `adapters.safetensors` (per module `lora_a` (in, r), `lora_b` (r, out) and, for
DoRA, the magnitude `m` (out,)) and `adapter_config.json` as mlx-lm's tuner writes it, plus an
`mlxlocal` block with the exact layer list. `scale` is what the layers use; `alpha`/`rslora`
are kept only so that PEFT's `lora_alpha` survives a round trip bit for bit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..checkpoint.files import weight_files
from ..checkpoint.inputs import read_json
from ..checkpoint.safetensors import load_lazy, read_header
from ..errors import MlxLocalError
from .formula import fuse, lora_alpha

LEAVES = ("lora_a", "lora_b", "m")
CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Adapter:
    """A LoRA/DoRA adapter in memory, whichever file layout it came from."""

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
        if self.alpha is not None:
            return self.alpha
        return lora_alpha(self.scale, self.rank, self.rslora)

    def fused_weight(self, module: str, weight: mx.array) -> mx.array:
        """`module`'s (out, in) weight with this adapter merged in, in float32."""
        leaves = self.modules[module]
        return fuse(weight, leaves["lora_a"], leaves["lora_b"], self.scale, leaves.get("m"))

    def block_layout(self) -> tuple[list[int], list[str]]:
        """(layer indices, paths inside a block) of the adapted modules."""
        layers, keys = set(), set()
        for name in self.modules:
            split = split_module(name)
            if split is None:
                raise MlxLocalError(f"the adapter's {name} is outside the transformer layers")
            layers.add(split[0])
            keys.add(split[1])
        return sorted(layers), sorted(keys)


def split_module(name: str) -> tuple[int, str] | None:
    """ "model.layers.3.self_attn.q_proj" → (3, "self_attn.q_proj"); None outside the blocks."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def adapter_config(
    kind: str,
    layers: list[int],
    n_layers: int,
    *,
    rank: int = 0,
    scale: float = 0.0,
    dropout: float = 0.0,
    keys: list[str] | None = None,
    alpha: float | None = None,
    rslora: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """adapter_config.json as mlx-lm's tuner writes it, plus our exact layer list.

    mlx-lm only knows "the last N layers": N covers the lowest chosen layer, and the layers in
    between get adapters whose B is zero, which leaves their output unchanged. `alpha` and
    `rslora` (which mlx-lm ignores) keep PEFT's lora_alpha exact on export.
    """
    config: dict[str, Any] = {"fine_tune_type": kind}
    if kind != "full":
        config["num_layers"] = n_layers - min(layers)
        config["lora_parameters"] = {
            "rank": rank,
            "scale": scale,
            "dropout": dropout,
            "keys": keys,
            "alpha": alpha,
            "rslora": rslora,
        }
    config["mlxlocal"] = {"layers": layers, **(extra or {})}
    return config


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The config of an adapter folder in mlx-lm's layout (LoRA, DoRA or full weights)."""
    path = Path(path)
    if not (path / CONFIG).exists() or not (path / WEIGHTS).exists():
        raise MlxLocalError(f"{path}: not an adapter folder (needs {CONFIG} and {WEIGHTS})")
    return read_json(path / CONFIG, "adapter config")


def read_adapter(path: str | Path) -> Adapter:
    """A LoRA/DoRA folder in mlx-lm's layout; tensors stay lazy until used."""
    path = Path(path)
    config = read_adapter_config(path)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise MlxLocalError(
            f"{path}: fine_tune_type {kind!r} is not an adapter (a full fine-tune saves whole "
            "weights); only LoRA and DoRA adapters can be fused or exported"
        )
    params = config.get("lora_parameters") or {}
    if "scale" not in params:
        raise MlxLocalError(f"{path / CONFIG}: lora_parameters has no scale")
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in load_lazy(path / WEIGHTS).items():
        module, _, leaf = key.rpartition(".")
        if leaf not in LEAVES:
            raise MlxLocalError(
                f"{path / WEIGHTS}: unexpected tensor {key}; not a LoRA/DoRA adapter"
            )
        modules.setdefault(module, {})[leaf] = value
    rank = check_modules(modules, kind, path / WEIGHTS)
    if params.get("rank", rank) != rank:
        # mlx-lm builds its layers from the config's rank, then fails on the tensors.
        raise MlxLocalError(
            f"{path / CONFIG}: lora_parameters.rank is {str(params['rank'])[:40]} but the "
            f"weights have rank {rank}; mlx-lm would refuse this adapter — is the config from "
            "another adapter?"
        )
    return Adapter(
        kind=kind,
        rank=rank,
        scale=float(params["scale"]),
        modules=modules,
        dropout=float(params.get("dropout", 0.0)),
        rslora=bool(params.get("rslora", False)),
        alpha=params.get("alpha"),
    )


def check_modules(modules: dict[str, dict[str, mx.array]], kind: str, where: Path) -> int:
    """The rank, after checking every module has its kind's tensors at one rank."""
    if not modules:
        raise MlxLocalError(f"{where}: holds no adapter tensors")
    for name, leaves in modules.items():
        if {"lora_a", "lora_b"} - set(leaves) or (kind == "dora") != ("m" in leaves):
            raise MlxLocalError(f"{where}: module {name} lacks some {kind} tensors")
    ranks = {leaves["lora_a"].shape[-1] for leaves in modules.values()}
    if len(ranks) != 1:
        raise MlxLocalError(f"{where}: modules have different ranks {sorted(ranks)}")
    return ranks.pop()


def write_adapter(
    adapter: Adapter, out: Path, n_layers: int, extra: dict[str, Any] | None = None
) -> None:
    """`adapter` into the folder `out` (which exists) in mlx-lm's layout."""
    layers, keys = adapter.block_layout()
    config = adapter_config(
        adapter.kind,
        layers,
        n_layers,
        rank=adapter.rank,
        scale=adapter.scale,
        dropout=adapter.dropout,
        keys=keys,
        alpha=adapter.lora_alpha,
        rslora=adapter.rslora,
        extra=extra,
    )
    tensors = {
        f"{name}.{leaf}": mx.contiguous(value)
        for name, leaves in adapter.modules.items()
        for leaf, value in leaves.items()
    }
    mx.save_safetensors(str(out / WEIGHTS), tensors)
    (out / CONFIG).write_text(json.dumps(config, indent=2))


def header_shapes(model: Path) -> dict[str, list[int]]:
    """Tensor name → shape of every tensor in an MLX checkpoint, from headers only."""
    header: dict[str, dict] = {}
    for f in weight_files(Path(model))[1]:
        header.update(read_header(f)[0])
    return {name: entry["shape"] for name, entry in header.items()}


def linear_shapes(model: Path, config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Module name → (out, in) of every linear layer in an MLX checkpoint, from headers only."""
    header = header_shapes(model)
    quant = config.get("quantization") or {}
    shapes = {}
    for key, shape in header.items():
        module, _, leaf = key.rpartition(".")
        if leaf != "weight" or len(shape) != 2 or module.endswith("embed_tokens"):
            continue
        out_dim, in_dim = shape
        if f"{module}.scales" in header:
            bits = (quant.get(module) if isinstance(quant.get(module), dict) else quant)["bits"]
            in_dim = in_dim * 32 // bits
        shapes[module] = (out_dim, in_dim)
    return shapes


def check_fits(adapter: Adapter, shapes: dict[str, tuple[int, int]], model: Path | str) -> None:
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
