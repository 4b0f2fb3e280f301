"""PEFT adapters in and out: `export peft ADAPTERS OUT`, `import peft PEFT_DIR OUT --model M`.

The two layouts hold the same numbers: PEFT's lora_A = lora_aᵀ (r×in), lora_B = lora_bᵀ
(out×r), lora_magnitude_vector = m; PEFT scales by lora_alpha/r (lora_alpha/√r with rsLoRA)
where mlx-lm stores the scale itself. Nothing is recomputed, so a round trip is bit for bit.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx

from ..checkpoint.atomic import atomic_directory, check_output
from ..checkpoint.safetensors import load_lazy
from ..checkpoint.torch_bin import load_torch_bin
from ..errors import MlxLocalError
from ..models import read_config
from .adapters import Adapter, check_fits, linear_shapes, load_adapter, read_json

PREFIX = "base_model.model."
_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "m"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# PEFT features with no counterpart in a LoRA/DoRA adapter of mlx-lm's layout.
_UNSUPPORTED = {
    "modules_to_save": "fully trained copies of whole modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
    "lora_bias": "trained LoRA biases",
    "fan_in_fan_out": "transposed (Conv1D, GPT-2 style) weights",
}


def read_peft(path: str | Path) -> Adapter:
    """A PEFT LoRA/rsLoRA/DoRA adapter directory as an Adapter (tensors in mlx-lm's layout)."""
    path = Path(path)
    config = read_json(path / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise MlxLocalError(
            f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA, "
            "with or without use_dora / use_rslora)"
        )
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise MlxLocalError(
                f"{path}: {key} ({what}) is not supported; only the LoRA/DoRA matrices can be "
                "imported — retrain without it"
            )
    if config.get("bias", "none") != "none":
        raise MlxLocalError(f"{path}: bias={config['bias']!r} (trained biases) is not supported")
    weights_file = path / "adapter_model.safetensors"
    tensors = (
        load_lazy(weights_file)
        if weights_file.exists()
        else load_torch_bin(path / "adapter_model.bin")
    )
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        leaf = next((k for k in _LEAVES if name.endswith("." + k)), None)
        if not key.startswith(PREFIX) or leaf is None:
            raise MlxLocalError(
                f"{path}: tensor {key} is not a LoRA/DoRA matrix of a linear layer; not supported"
            )
        module = name[: -len(leaf) - 1]
        modules.setdefault(module, {})[_LEAVES[leaf]] = value.T if value.ndim == 2 else value
    if not modules:
        raise MlxLocalError(f"{path}: the adapter holds no tensors")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora"))
    kind = "dora" if config.get("use_dora") else "lora"
    for name, leaves in modules.items():
        if {"lora_a", "lora_b"} - set(leaves) or (kind == "dora") != ("m" in leaves):
            raise MlxLocalError(f"{path}: module {name} lacks some {kind} tensors")
    targets = config.get("target_modules") or []
    return Adapter(
        kind=kind,
        rank=r,
        scale=alpha / (math.sqrt(r) if rslora else r),
        modules=modules,
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=rslora,
        alpha=config["lora_alpha"],
        targets=[targets] if isinstance(targets, str) else list(targets),
    )


def export_peft(
    adapters: str | Path, out: str | Path, *, base_model: str | None = None, force: bool = False
) -> Path:
    """Write an adapter (mlx-lm layout) as a PEFT directory that PeftModel.from_pretrained loads."""
    out = Path(out)
    check_output(out, force)
    adapter = load_adapter(adapters)
    layers = {}
    for name in adapter.modules:
        m = _LAYER.match(name)
        if m:
            layers.setdefault(m.group(2), set()).add(int(m.group(1)))
    names = sorted(adapter.modules)
    indices = sorted(set().union(*layers.values())) if layers else []
    product = len(layers) * len(indices) == len(names) and all(
        v == set(indices) for v in layers.values()
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.lora_alpha,
        "lora_dropout": adapter.dropout,
        "use_rslora": adapter.rslora,
        "use_dora": adapter.kind == "dora",
        "target_modules": sorted(layers) if product else names,
        "layers_to_transform": indices if product else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, leaves in adapter.modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = leaves["lora_a"].T
        tensors[f"{PREFIX}{name}.lora_B.weight"] = leaves["lora_b"].T
        if "m" in leaves:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = leaves["m"]
    with atomic_directory(out, force) as tmp:
        mx.save_safetensors(
            str(tmp / "adapter_model.safetensors"),
            {k: mx.contiguous(v) for k, v in tensors.items()},
            metadata={"format": "pt"},
        )
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def import_peft(
    peft_dir: str | Path, out: str | Path, model: str | Path, *, force: bool = False
) -> Path:
    """Write a PEFT adapter in mlx-lm's layout for the MLX checkpoint `model`, checking it fits."""
    out, model = Path(out), Path(model)
    check_output(out, force)
    adapter = read_peft(peft_dir)
    config = read_config(model)
    shapes = linear_shapes(model, config)
    leaf_names = {name.rsplit(".", 1)[-1] for name in shapes} | {
        name.split(".", 3)[-1] for name in shapes if _LAYER.match(name)
    }
    for target in adapter.targets:
        if re.fullmatch(r"[\w.]+", target) and target not in leaf_names and target not in shapes:
            raise MlxLocalError(
                f"{peft_dir}: target module {target!r} is not a linear layer of {model} "
                f"({config['model_type']}); is the adapter for another architecture?"
            )
    check_fits(adapter, shapes, model)
    layers, keys = set(), set()
    for name in adapter.modules:
        m = _LAYER.match(name)
        if not m:
            raise MlxLocalError(
                f"{peft_dir}: {name} is outside the transformer layers; unsupported"
            )
        layers.add(int(m.group(1)))
        keys.add(m.group(2))
    settings = {
        "fine_tune_type": adapter.kind,
        "num_layers": config["num_hidden_layers"] - min(layers),
        "lora_parameters": {
            "rank": adapter.rank,
            "scale": adapter.scale,
            "dropout": adapter.dropout,
            "keys": sorted(keys),
            "alpha": adapter.lora_alpha,
            "rslora": adapter.rslora,
        },
        "model": str(model),
        "mlxlocal": {"layers": sorted(layers), "source": str(peft_dir)},
    }
    tensors = {
        f"{name}.{leaf}": mx.contiguous(value)
        for name, leaves in adapter.modules.items()
        for leaf, value in leaves.items()
    }
    with atomic_directory(out, force) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), tensors)
        (tmp / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    return out
