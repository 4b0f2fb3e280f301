"""PEFT's adapter layout, read into and written from an `Adapter`.

The two layouts hold the same numbers: PEFT's lora_A = lora_aᵀ (r×in), lora_B = lora_bᵀ
(out×r), lora_magnitude_vector = m; PEFT scales by lora_alpha/r (lora_alpha/√r with rsLoRA)
where mlx-lm stores the scale itself. Nothing is recomputed, so a round trip is bit for bit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..checkpoint.inputs import read_json
from ..checkpoint.safetensors import load_lazy
from ..checkpoint.torch_bin import load_torch_bin
from ..errors import MlxLocalError
from .files import Adapter, check_modules, read_adapter, split_module
from .formula import lora_scale

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "m"}
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


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).exists() or (Path(path) / "adapter_model.bin").exists()


def read_any(path: str | Path) -> Adapter:
    """A LoRA/DoRA adapter folder in mlx-lm's layout or PEFT's."""
    return read_peft(path) if is_peft_dir(path) else read_adapter(path)


def read_peft(path: str | Path) -> Adapter:
    """A PEFT LoRA/rsLoRA/DoRA adapter directory as an Adapter (tensors in mlx-lm's layout)."""
    path = Path(path)
    if not is_peft_dir(path):
        raise MlxLocalError(
            f"{path}: not a PEFT adapter folder (needs adapter_config.json and {WEIGHTS} or "
            "adapter_model.bin)"
        )
    config = read_json(path / "adapter_config.json", "adapter config")
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
    tensors = (
        load_lazy(path / WEIGHTS)
        if (path / WEIGHTS).exists()
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
    kind = "dora" if config.get("use_dora") else "lora"
    r = check_modules(modules, kind, path)
    if config.get("r") != r:  # else the scale is wrong and the shapes seem the model's fault
        raise MlxLocalError(
            f"{path / 'adapter_config.json'}: r is {str(config.get('r'))[:40]} but the weights "
            f"have rank {r}; is the config from another adapter?"
        )
    alpha = float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora"))
    targets = config.get("target_modules") or []
    return Adapter(
        kind=kind,
        rank=r,
        scale=lora_scale(alpha, r, rslora),
        modules=modules,
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=rslora,
        alpha=config["lora_alpha"],
        targets=[targets] if isinstance(targets, str) else list(targets),
    )


def check_targets(adapter: Adapter, linear_names: Iterable[str], where: str, model: str) -> None:
    """Refuse PEFT target_modules that name no linear layer of the model (another architecture)."""
    names = set(linear_names)
    leaf_names = {n.rsplit(".", 1)[-1] for n in names} | {
        split[1] for n in names if (split := split_module(n))
    }
    for target in adapter.targets:
        if re.fullmatch(r"[\w.]+", target) and target not in leaf_names | names:
            raise MlxLocalError(
                f"{where}: target module {target!r} is not a linear layer of {model}; "
                "is the adapter for another architecture?"
            )


def write_peft(adapter: Adapter, out: Path, base_model: str | None = None) -> None:
    """`adapter` into the folder `out` (which exists) as PeftModel.from_pretrained reads it."""
    layers: dict[str, set[int]] = {}
    for name in adapter.modules:
        if split := split_module(name):
            layers.setdefault(split[1], set()).add(split[0])
    names = sorted(adapter.modules)
    indices = sorted(set().union(*layers.values())) if layers else []
    # target_modules × layers_to_transform when the modules form that product, else full names.
    product = len(layers) * len(indices) == len(names) and all(
        v == set(indices) for v in layers.values()
    )
    config: dict[str, Any] = {
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
        tensors[f"{PREFIX}{name}.lora_A.weight"] = mx.contiguous(leaves["lora_a"].T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = mx.contiguous(leaves["lora_b"].T)
        if "m" in leaves:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = leaves["m"]
    mx.save_safetensors(str(out / WEIGHTS), tensors, metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
