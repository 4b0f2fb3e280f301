"""LoRA and DoRA layers on Linear and QuantizedLinear layers of any bit width, and putting
adapters into a model: for training (fresh) or from a folder (ours, mlx-lm's or PEFT's).

The module tree matches mlx-lm's tuner (`<path>.linear` is the frozen base, `lora_a` is (in, r),
`lora_b` is (r, out), DoRA's magnitude `m` is (out,)), so the adapters we save open with
`mlx_lm.load(..., adapter_path=...)`. Unlike mlx-lm's DoRA, a quantized base's input width and
dense weight come from the layer's own bits, group size and mode, so 3-, 5- and 6-bit bases work.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import MlxLocalError
from ..resources import family_spec
from .files import CONFIG, WEIGHTS, Adapter, read_adapter, read_adapter_config
from .formula import fuse
from .peft import check_targets, is_peft_dir, read_peft

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)


def dense_weight(linear: nn.Module) -> mx.array:
    """The (out, in) float weight of a Linear, dequantized for a QuantizedLinear."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight,
            linear.scales,
            linear.get("biases"),
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
    return linear.weight


def input_dims(linear: nn.Module) -> int:
    if isinstance(linear, nn.QuantizedLinear):
        return linear.weight.shape[1] * 32 // linear.bits
    return linear.weight.shape[1]


class LoRALinear(nn.Module):
    """y = base(x) + scale · dropout(x) A B, with the base frozen and B starting at zero."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        base.freeze()
        self.linear = base
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        in_dims, out_dims = input_dims(base), base.weight.shape[0]
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * z).astype(x.dtype)

    def fused_weight(self) -> mx.array:
        """The adapted (out, in) weight in the base's dtype."""
        w = dense_weight(self.linear)
        return fuse(w, self.lora_a, self.lora_b, self.scale, self.get("m")).astype(w.dtype)


class DoRALinear(LoRALinear):
    """DoRA: y = m / ‖W + ΔW‖ · (x Wᵀ + scale · x A B) + bias, row norms held constant.

    The norm is not differentiated (as in the DoRA paper), so the dense weight it needs is
    transient and nothing but the quantized base is kept for the backward pass.
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        self.m = mx.linalg.norm(dense_weight(base).astype(mx.float32), axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        base = self.linear
        if isinstance(base, nn.QuantizedLinear):
            y = mx.quantized_matmul(
                x,
                base.weight,
                base.scales,
                base.get("biases"),
                transpose=True,
                group_size=base.group_size,
                bits=base.bits,
                mode=base.mode,
            )
        else:
            y = x @ base.weight.T
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        y = y + (self.scale * z).astype(x.dtype)
        adapted = fuse(dense_weight(base), self.lora_a, self.lora_b, self.scale)
        norm = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
        y = (self.m / norm).astype(x.dtype) * y
        return y + base.bias if "bias" in base else y


LAYER_CLASSES = {"lora": LoRALinear, "dora": DoRALinear}


def resolve_layers(spec: str | int | list[int], n_layers: int) -> list[int]:
    """Block indices from the recipe's `method.layers`: "all", last N, or a list."""
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, int):
        if not 1 <= spec <= n_layers:
            raise MlxLocalError(
                f"method.layers: {spec} but the model has {n_layers} layers; "
                f"use 1..{n_layers} or 'all'"
            )
        return list(range(n_layers - spec, n_layers))
    bad = [i for i in spec if not 0 <= i < n_layers]
    if bad or not spec:
        raise MlxLocalError(
            f"method.layers: {bad or spec} not in 0..{n_layers - 1} (the model's layer indices)"
        )
    return sorted(set(spec))


def default_modules(model_type: str) -> list[str] | None:
    """The family's usual LoRA targets (convert/<type>.yaml), or None for every linear layer."""
    spec = family_spec(model_type) or {}
    return spec.get("lora_targets")


def adapter_keys(blocks: list[nn.Module], modules: list[str] | None) -> list[str]:
    """Paths inside the blocks of the linear layers named in `modules` (by last name or path).

    None means every linear layer, as mlx-lm's tuner does by default.
    """
    paths = sorted(
        {p for block in blocks for p, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}
    )
    if modules is None:
        return paths

    def named(path: str, name: str) -> bool:
        return path == name or path.rsplit(".", 1)[-1] == name

    missing = [n for n in modules if not any(named(p, n) for p in paths)]
    if missing:
        raise MlxLocalError(
            f"method.modules: no linear layer named {missing[0]!r} in the model's blocks; "
            f"they are: {', '.join(paths)}"
        )
    return [p for p in paths if any(named(p, n) for n in modules)]


def add_adapters(
    model: nn.Module,
    kind: str,
    rank: int,
    scale: float,
    dropout: float,
    keys: list[str],
    layers: list[int],
) -> None:
    """Freeze the model and wrap `keys` (paths inside a block) of `layers` with LoRA or DoRA."""
    cls = LAYER_CLASSES[kind]
    model.freeze()
    for i in layers:
        block = model.layers[i]
        modules = dict(block.named_modules())
        wrapped = [(k, cls(modules[k], rank, scale, dropout)) for k in keys if k in modules]
        block.update_modules(tree_unflatten(wrapped))


def save_adapters(model: nn.Module, out: Path, config: dict[str, Any]) -> None:
    """The trainable parameters and `config` into the folder `out`, in mlx-lm's layout."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(Path(out) / WEIGHTS), weights)
    (Path(out) / CONFIG).write_text(json.dumps(config, indent=2))


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Put the adapters saved at `path` into `model`, in memory: ours, mlx-lm's or PEFT's.

    A full fine-tune's folder holds whole weights, which replace the model's.
    """
    path = Path(path)
    if is_peft_dir(path):
        adapter = read_peft(path)
        linear = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
        check_targets(adapter, linear, str(path), "this model")
        apply_adapter(model, adapter)
    elif read_adapter_config(path).get("fine_tune_type") == "full":
        _load_full(model, path)
    else:
        apply_adapter(model, read_adapter(path))


def adapted_copy(model: nn.Module, path: str | Path) -> nn.Module:
    """`model` with the adapters at `path`, as a new module tree that shares every weight of
    `model`, which stays as it was: one base in memory serves several adapters (`serve`)."""
    variant = _shared_copy(model)
    load_adapters(variant, path)
    variant.eval()
    mx.eval(variant.parameters())  # read now: a lazy array belongs to this thread's stream
    return variant


def _shared_copy(value: Any) -> Any:
    """Modules, lists and dicts copied; arrays and everything else shared."""
    if isinstance(value, nn.Module):
        new = copy.copy(value)  # a new dict of the same children; __dict__ copied one level
        new.__dict__.update({k: copy.copy(v) for k, v in vars(value).items() if _container(v)})
        for key, child in value.items():
            new[key] = _shared_copy(child)
        return new
    if isinstance(value, list | tuple):
        return type(value)(_shared_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _shared_copy(v) for k, v in value.items()}
    return value


def _container(value: Any) -> bool:
    return isinstance(value, set | list | dict) and not isinstance(value, nn.Module)


def apply_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Freeze `model` and wrap each module `adapter` names with a layer holding its tensors."""
    model.freeze()
    modules = dict(model.named_modules())
    wrapped = []
    for name, leaves in adapter.modules.items():
        base = modules.get(name)
        if not isinstance(base, LINEAR_TYPES):
            raise MlxLocalError(
                f"the adapter targets {name}, which the model does not have as a linear layer; "
                "is the adapter for another architecture?"
            )
        layer = LAYER_CLASSES[adapter.kind](base, adapter.rank, adapter.scale, adapter.dropout)
        for leaf, value in leaves.items():
            expected = getattr(layer, leaf).shape
            if tuple(value.shape) != tuple(expected):
                raise MlxLocalError(
                    f"the adapter's {name}.{leaf} has shape {tuple(value.shape)} but the model "
                    f"expects {tuple(expected)}; is the adapter for another model size?"
                )
            setattr(layer, leaf, value)
        wrapped.append((name, layer))
    model.update_modules(tree_unflatten(wrapped))


def _load_full(model: nn.Module, path: Path) -> None:
    """Whole trained weights over the model's, checked name by name and shape by shape."""
    weights = mx.load(str(path / WEIGHTS))
    expected = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        if name not in expected:
            raise MlxLocalError(f"{path}: {name} is not a parameter of this model")
        if w.shape != expected[name].shape:
            raise MlxLocalError(
                f"{path}: {name} has shape {tuple(w.shape)} but the model expects "
                f"{tuple(expected[name].shape)}; were these weights trained on this model?"
            )
    model.load_weights(list(weights.items()), strict=False)
