"""`info`: what a checkpoint, an adapter folder or a training run is, read from headers and
small files without loading a single tensor."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .adapters.files import CONFIG as ADAPTER_CONFIG
from .adapters.files import WEIGHTS as ADAPTER_WEIGHTS
from .adapters.files import read_adapter_config
from .checkpoint.files import weight_files
from .checkpoint.inputs import JSONProblem, decode_json
from .checkpoint.safetensors import DTYPE_BYTES, read_header
from .checkpoint.torch_bin import read_torch_bin_header
from .models import context_length, read_config
from .sources import resolve_source

_DTYPE_NAMES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "U32": "uint32",
    "U8": "uint8",
    "I64": "int64",
    "I32": "int32",
}


def info(path: str | Path) -> dict[str, Any]:
    """A plain dict describing the checkpoint (folder or cached Hub id), adapter folder or
    training run directory at `path`."""
    folder = Path(path).expanduser()
    if (folder / ADAPTER_CONFIG).is_file():
        return describe_adapter(folder)
    if (folder / "recipe.yaml").is_file() and not (folder / "config.json").exists():
        from .report import describe_run

        return describe_run(folder)
    return checkpoint_info(path)


def describe_adapter(path: Path) -> dict[str, Any]:
    """An adapter folder (mlx-lm's layout, as `run` writes it): method, rank, targets, base."""
    config = read_adapter_config(path)
    header, _ = read_header(path / ADAPTER_WEIGHTS)
    lora = config.get("lora_parameters") or {}
    ours = config.get("mlxlocal") or {}
    quant = ours.get("quantize") or None
    return {
        "path": str(path),
        "kind": "adapter",
        "method": config.get("fine_tune_type", "lora"),
        "rank": lora.get("rank"),
        "alpha": lora.get("alpha"),
        "scale": lora.get("scale"),
        "targets": lora.get("keys"),
        "layers": ours.get("layers") or config.get("num_layers"),
        "base": ours.get("model"),
        "base quantization": f"{quant['bits']}-bit, group size {quant['group_size']}"
        if quant
        else None,
        "parameters": sum(math.prod(e["shape"]) for e in header.values()),
        "size_bytes": (path / ADAPTER_WEIGHTS).stat().st_size,
    }


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """A plain dict describing the checkpoint at `path` (folder or cached Hub id)."""
    src = resolve_source(path, download=False)  # info reads only what is on this machine
    config = read_config(src)
    kind, files = weight_files(src)
    tensors, fmt = _tensor_table(kind, files)
    quant = config.get("quantization") or None
    params = sum(_logical_params(name, t, tensors, quant) for name, t in tensors.items())
    weight_bytes = sum(t["bytes"] for t in tensors.values())
    dtypes = Counter()
    for t in tensors.values():
        dtypes[_DTYPE_NAMES.get(t["dtype"], t["dtype"].lower())] += t["bytes"]
    result: dict[str, Any] = {
        "path": str(src),
        "format": "mlx" if fmt == "mlx" or "mlxlocal" in config else f"hf ({kind})",
        "model_type": config["model_type"],
        "architectures": config.get("architectures"),
        "parameters": params,
        # Shares of the bytes; tensors that are all empty have none to share.
        "dtypes": {d: round(b / weight_bytes, 4) for d, b in dtypes.most_common() if b},
        "quantization": None,
        "size_bytes": sum(f.stat().st_size for f in files),
        "shards": len(files),
        "context_length": context_length(config),
        "tokenizer": tokenizer_kind(src),
        "chat_template": has_chat_template(src),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
    }
    if quant:
        result["quantization"] = {
            "bits": quant.get("bits"),
            "group_size": quant.get("group_size"),
            "mode": quant.get("mode", "affine"),
            "bits_per_weight": round(weight_bytes * 8 / params, 3) if params else None,
            "per_layer_overrides": sum(isinstance(v, dict) for v in quant.values()),
        }
    return result


def _tensor_table(kind: str, files: list[Path]) -> tuple[dict[str, dict], str]:
    table: dict[str, dict] = {}
    fmt = "hf"
    for f in files:
        if kind == "bin":
            for name, (dtype, shape) in read_torch_bin_header(f).items():
                table[name] = {
                    "dtype": str(dtype).split(".")[-1].upper(),
                    "shape": list(shape),
                    "bytes": math.prod(shape) * dtype.size,
                }
            continue
        header, metadata = read_header(f)
        if metadata.get("format") == "mlx":
            fmt = "mlx"
        for name, e in header.items():
            nbytes = math.prod(e["shape"]) * DTYPE_BYTES[e["dtype"]]
            table[name] = {"dtype": e["dtype"], "shape": e["shape"], "bytes": nbytes}
    return table, fmt


def _logical_params(name: str, t: dict, table: dict[str, dict], quant: dict | None) -> int:
    """Parameters a tensor stands for: a packed weight holds 32/bits values per uint32."""
    module, _, leaf = name.rpartition(".")
    if leaf in ("scales", "biases") and f"{module}.weight" in table and quant:
        return 0
    n = math.prod(t["shape"])
    if leaf == "weight" and quant and f"{module}.scales" in table:
        layer = quant.get(module) if isinstance(quant.get(module), dict) else quant
        return n * 32 // int(layer.get("bits", quant.get("bits", 4)))
    return n


def tokenizer_kind(path: Path) -> str | None:
    """'BPE (tokenizer.json)', 'SentencePiece (tokenizer.model)', … or None."""
    path = Path(path)
    kinds = []
    if (path / "tokenizer.json").exists():
        try:
            model = decode_json((path / "tokenizer.json").read_bytes()).get("model", {})
            kinds.append(f"{model.get('type', 'unknown')} (tokenizer.json)")
        except (JSONProblem, AttributeError):
            kinds.append("unreadable tokenizer.json")
    if (path / "tokenizer.model").exists():
        kinds.append("SentencePiece (tokenizer.model)")
    return ", ".join(kinds) or None


def has_chat_template(path: Path) -> bool:
    path = Path(path)
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return True
    try:
        cfg = decode_json((path / "tokenizer_config.json").read_bytes())
    except (OSError, JSONProblem):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))


def format_info(data: dict[str, Any]) -> str:
    """Human-readable lines for `mlxlocal info`."""
    if "kind" in data:  # an adapter folder or a training run: its fields as they are
        rows = [(k.replace("_", " "), _shown(k, v)) for k, v in data.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    q = data["quantization"]
    quant = (
        f"{q['bits']}-bit {q['mode']}, group size {q['group_size']}, "
        f"{q['bits_per_weight']} bits/weight"
        + (f", {q['per_layer_overrides']} per-layer overrides" if q["per_layer_overrides"] else "")
        if q
        else "none"
    )
    rows = [
        ("path", data["path"]),
        ("format", data["format"]),
        ("architecture", data["model_type"]),
        ("parameters", f"{data['parameters']:,} ({_human(data['parameters'], '')})"),
        ("dtypes", ", ".join(f"{d} {p:.0%}" for d, p in data["dtypes"].items())),
        ("quantization", quant),
        ("size on disk", _human(data["size_bytes"], "B")),
        ("shards", data["shards"]),
        ("layers / hidden", f"{data['layers']} / {data['hidden_size']}"),
        ("context length", data["context_length"] or "unknown"),
        ("vocab size", data["vocab_size"]),
        ("tokenizer", data["tokenizer"] or "none found"),
        ("chat template", "yes" if data["chat_template"] else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if key == "size_bytes":
        return _human(value, "B")
    if key == "parameters":
        return f"{value:,} ({_human(value, '')})"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _human(n: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}".strip() if prefix else f"{n} {unit}".strip()
        n /= 1000
    return str(n)
