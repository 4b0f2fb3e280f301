"""`mlxlocal fuse MODEL ADAPTERS OUT`: merge trained adapters into the weights.

Each adapted layer becomes its fused weight (`mlxlocal.adapters.formula.fuse`); a
quantized layer is quantized again with its own bits, group size and mode unless `dequantize`
asks for a float model. QLoRA adapters over their float base are fused into the base quantized
as in training. The output is an MLX checkpoint written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..adapters.files import read_adapter_config
from ..adapters.layers import LoRALinear
from ..checkpoint.atomic import atomic_directory, check_output
from ..checkpoint.files import copy_tokenizer_files
from ..checkpoint.shards import ShardWriter, parse_size
from ..models import load, read_config
from ..progress import progress


@dataclass
class FuseResult:
    out: Path
    fused_layers: int
    quantized: bool
    shards: list[str]
    bytes: int


def fused_linear(layer: LoRALinear, dequantize: bool) -> nn.Module:
    """The adapted layer as one plain Linear, or QuantizedLinear like its base."""
    base = layer.linear
    weight = layer.fused_weight()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in base)
    out.weight = weight
    if "bias" in base:
        out.bias = base.bias
    if isinstance(base, nn.QuantizedLinear) and not dequantize:
        return nn.QuantizedLinear.from_linear(out, base.group_size, base.bits, mode=base.mode)
    return out


def fuse(
    model_path: str | Path,
    adapters: str | Path,
    out: str | Path,
    dequantize: bool = False,
    force: bool = False,
    shard_size: str = "5GB",
) -> FuseResult:
    """Write MODEL with ADAPTERS merged into OUT (an MLX checkpoint mlx-lm opens)."""
    from mlx_lm.utils import dequantize_model

    model_path, adapters, out = Path(model_path), Path(adapters), Path(out)
    check_output(out, force)
    base = (read_adapter_config(adapters).get("mlxlocal") or {}).get("base")
    config = read_config(model_path)
    model, _ = load(model_path, adapters, lazy=True)
    if "quantization" not in config and isinstance(base, dict) and base.get("quantization"):
        # QLoRA over a float MODEL: load quantized it as training did; so is the output.
        config["quantization"] = config["quantization_config"] = base["quantization"]
    fused = [
        (name, fused_linear(m, dequantize))
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    config["mlxlocal"] = {**config.get("mlxlocal", {}), "fused_adapters": str(adapters.resolve())}

    weights = dict(tree_flatten(model.parameters()))
    with atomic_directory(out, force) as tmp:
        with ShardWriter(tmp, weights, parse_size(shard_size)) as writer:
            for name in progress(list(weights), "fusing", total=len(weights), unit="tensor"):
                writer.write(name, weights.pop(name))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer_files(model_path, tmp)
    quantized = "quantization" in config
    return FuseResult(out, len(fused), quantized, writer.names, writer.total_bytes)
