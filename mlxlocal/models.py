"""The bridge to mlx-lm: read and normalise configs, pick architecture classes, load models.

mlx-lm owns the architectures; this module owns what goes wrong between a Hugging Face config
and mlx-lm's dataclasses (silent config drift) and turns mlx-lm's exceptions into clear errors.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import pkgutil
import types
import typing
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters.layers import load_adapters
from .checkpoint.dtypes import DTYPES
from .checkpoint.inputs import read_json
from .checkpoint.safetensors import read_header
from .errors import MlxLocalError

if TYPE_CHECKING:
    import mlx.nn as nn

# mlx-lm modules that are building blocks, not architectures.
_NOT_ARCHITECTURES = {
    "activations",
    "base",
    "bitlinear_layers",
    "cache",
    "gated_delta",
    "mla",
    "pipeline",
    "rope_utils",
    "ssm",
    "switch_layers",
}


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, with errors that say what to do."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise MlxLocalError(
            f"{path}: no config.json — is this a Hugging Face or MLX model directory?"
        )
    config = read_json(file, "model config", "re-download the checkpoint")
    if "model_type" not in config:
        raise MlxLocalError(f"{file}: no model_type; this does not look like a model config")
    check_config(config)
    return config


def check_config(config: dict[str, Any]) -> None:
    """Refuse config values mlx-lm would misread silently or crash on much later.

    Every field the architecture's ModelArgs declares as a bool, number, string, list or dict
    must hold that JSON type (`tie_word_embeddings: "no"` would drop lm_head; `rope_theta:
    "fast"` converts and fails at the first token); rope settings must be complete; the
    model_type must name an architecture, not one of mlx-lm's building blocks; a `quantization`
    block must be one mlx-lm can apply (every verb reads config.json through here).
    """
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or (
        MODEL_REMAPPING.get(model_type, model_type) in _NOT_ARCHITECTURES
    ):
        raise _unsupported(model_type)
    eos_token_ids(config, "config.json")
    check_quantization(config)
    for key in ("rope_parameters", "rope_scaling"):
        _check_rope(key, config.get(key))
    if model_type in supported_model_types():
        _check_field_types(config, model_classes(config)[1])


def _unsupported(model_type: object) -> MlxLocalError:
    types_ = ", ".join(supported_model_types())
    return MlxLocalError(
        f"model_type {str(model_type)[:40]!r} is not supported by mlx-lm (supported: {types_})"
    )


def eos_token_ids(config: object, file: str | Path) -> set[int]:
    """The `eos_token_id`s (an id or a list of them) a config declares."""
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    ids = [] if eos is None else [eos] if _is_id(eos) else eos
    if not isinstance(ids, list) or not all(map(_is_id, ids)):
        raise MlxLocalError(
            f"{file}: eos_token_id must be a token id or a list of them, not {_shown(eos)}; "
            "fix the file"
        )
    return set(ids)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The JSON values a ModelArgs annotation accepts (None is always accepted: "not set").
_JSON_TYPES: dict[object, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: (
        "a number",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    ),
    str: ("a string", lambda v: isinstance(v, str)),
    list: ("a list", lambda v: isinstance(v, list)),
    tuple: ("a list", lambda v: isinstance(v, list)),
    dict: ("an object", lambda v: isinstance(v, dict)),
}


def _json_types(hint: object) -> list[tuple[str, Any]] | None:
    """What a field annotated `hint` may hold in JSON, or None when the annotation is not
    plain data (Any, a nested ModelArgs class) and so cannot be checked."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        found = [_json_types(a) for a in typing.get_args(hint) if a is not type(None)]
        return None if None in found else [t for f in found for t in f]
    base = origin or hint
    return [_JSON_TYPES[base]] if base in _JSON_TYPES else None


def _check_field_types(config: dict[str, Any], args_class: type) -> None:
    try:
        hints = typing.get_type_hints(args_class)
    except Exception:  # an annotation mlx-lm itself cannot resolve: nothing to check against
        return
    fields = getattr(args_class, "__dataclass_fields__", {})
    for key in sorted(set(fields) & set(config)):
        value, allowed = config[key], _json_types(hints.get(key))
        if value is None or allowed is None or any(ok(value) for _, ok in allowed):
            continue
        wanted = " or ".join(dict.fromkeys(name for name, _ in allowed))
        raise MlxLocalError(
            f"config.json: {key} is {_shown(value)}, not {wanted}; "
            "fix the config or re-download the checkpoint"
        )


def _shown(value: object) -> str:
    """A config value as JSON, short enough for one line."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    try:
        return json.dumps(value)[:40]
    except ValueError:  # an integer past Python's digit limit
        return "a huge number"


# Rope types mlx-lm builds (rope_utils.initialize_rope, and Phi-3's own "su"), and the
# settings each cannot do without.
_ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
    "deepseek_yarn": ("factor",),
    "telechat3-yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "su": ("short_factor", "long_factor"),
    "proportional": (),
    "mrope": (),
}


def _check_rope(key: str, value: object) -> None:
    """`rope_scaling`/`rope_parameters`: absent, or one block (or one per layer type) with a
    known rope_type, a numeric rope_theta and factors, and the settings that type needs."""
    if value is None:
        return
    blocks = {key: value}
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        blocks = {f"{key}.{name}": block for name, block in value.items()}
    for where, block in blocks.items():
        fix = "fix the config or re-download the checkpoint"
        if not isinstance(block, dict):
            raise MlxLocalError(
                f"config.json: {where} is {_shown(block)}, not an object like "
                f'{{"rope_type": "linear", "factor": 2.0}}; {fix}'
            )
        rope_type = block.get("rope_type", block.get("type")) or "default"
        if rope_type not in _ROPE_TYPES:
            raise MlxLocalError(
                f"config.json: {where} has rope_type {str(rope_type)[:40]!r}, which mlx-lm "
                f"does not build (known: {', '.join(_ROPE_TYPES)}); {fix}"
            )
        for name in _ROPE_TYPES[rope_type]:
            if name not in block:
                raise MlxLocalError(f"config.json: {where} ({rope_type}) has no {name}; {fix}")
        for name in ("rope_theta", "factor", "partial_rotary_factor"):
            value = block.get(name, 1)
            if not _JSON_TYPES[float][1](value) or value <= 0:
                raise MlxLocalError(
                    f"config.json: {where}.{name} is {_shown(value)}, not a positive number; {fix}"
                )


def supported_model_types() -> list[str]:
    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING

    names = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    return sorted((names - _NOT_ARCHITECTURES) | set(MODEL_REMAPPING))


def model_classes(config: dict[str, Any]) -> tuple[type, type]:
    """mlx-lm's (Model, ModelArgs) for a config, or an error listing what is supported."""
    from mlx_lm.utils import MODEL_REMAPPING, _get_classes

    model_type = config.get("model_type")
    if MODEL_REMAPPING.get(model_type, model_type) in _NOT_ARCHITECTURES:
        raise _unsupported(model_type)
    try:
        return _get_classes(config)
    except ValueError as e:
        raise _unsupported(model_type) from e


# Counts and dimensions every architecture that has them builds from: positive ints.
_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
# How the architectures name their layer count.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# The fewest weights (elements; packed quantized words count once) a real layer holds: a toy
# model of width 16 has ~4,000 per layer, packed at 4 bits ~700.
MIN_LAYER_WEIGHTS = 256


def build_model(config: dict[str, Any], shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    """mlx-lm's model for `config`, weights not yet loaded.

    `shapes` (name → shape of every tensor the files hold, read from their headers) bounds the
    config before a layer is built — building costs about 100 KB per layer whatever the files
    hold, so a config asking for 10^7 layers beside a few tensors must fail here, not after
    gigabytes. A config mlx-lm cannot take is an error that names the architecture rather than
    mlx-lm's bare exception.
    """
    check_config(config)
    check_config_sizes(config, shapes)
    check_rope_built(config)
    model = instantiate(config)
    own_rope(model, config)
    return model


def instantiate(config: dict[str, Any]) -> nn.Module:
    """mlx-lm's model for `config`, its arrays lazy; a config it cannot take names the
    architecture rather than mlx-lm's bare exception."""
    model_class, args_class = model_classes(config)
    try:
        return model_class(args_class.from_dict(config))
    except (TypeError, ValueError, KeyError, AssertionError, ArithmeticError) as e:
        raise MlxLocalError(
            f"config.json does not fit mlx-lm's {config['model_type']} model ({e!r}); "
            "check the config"
        ) from None


# Rope types each architecture's mlx-lm model builds, where that is not every type mlx-lm knows:
# gemma2 has no rope scaling at all and phi3 prints a warning and rotates without any.
_ARCH_ROPE_TYPES = {"gemma2": ("default",), "phi3": ("default", "linear", "longrope", "su")}
_YARN = ("yarn", "deepseek_yarn", "telechat3-yarn")


def check_rope_built(config: dict[str, Any]) -> None:
    """Refuse rope settings mlx-lm would drop without a word (wrong logits, not an error)."""
    scaling = config.get("rope_scaling") or {}
    if not isinstance(scaling, dict) or all(isinstance(v, dict) for v in scaling.values()):
        return  # per-layer-type blocks: the architectures that have them read them
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    model_type = config.get("model_type")
    built = _ARCH_ROPE_TYPES.get(model_type)
    if built and kind not in built:
        raise MlxLocalError(
            f"config.json: mlx-lm's {model_type} model ignores rope_scaling {str(kind)[:40]!r} "
            f"and would give wrong logits; {model_type} converts with {', '.join(built)} only"
        )
    if kind in _YARN and "attention_factor" in scaling:
        raise MlxLocalError(
            f"config.json: mlx-lm's {kind} rope ignores rope_scaling.attention_factor and "
            "would give wrong logits; remove it only if it equals yarn's default"
        )


def own_rope(model: nn.Module, config: dict[str, Any]) -> None:
    """Put our rope where mlx-lm's differs from transformers' (the reference) for `config`.

    mlx-lm's SuScaledRoPE (Phi-3 `longrope`/`su`) always rotates with the long factors;
    transformers uses the short ones while the sequence fits original_max_position_embeddings
    (every prompt under 4096 tokens on Phi-3.5-mini): logits off by up to 24 on real configs.
    """
    from mlx_lm.models.rope_utils import SuScaledRoPE

    from .rope import LongRoPE

    scaling = config.get("rope_scaling") or {}
    for _, module in model.named_modules():
        rope = module.get("rope") if isinstance(module, dict) else getattr(module, "rope", None)
        if isinstance(rope, SuScaledRoPE) and "short_factor" in scaling:
            module.rope = LongRoPE(rope, config)


def check_config_sizes(config: dict[str, Any], shapes: Mapping[str, Sequence[int]]) -> None:
    """Sizes must be positive ints, the layer count at most the numbered layers the files
    hold, and hidden/vocab sizes at most the largest dimension of any tensor in them."""
    for key in (*_SIZE_KEYS, *_LAYER_KEYS):
        value = config.get(key)
        if key in config and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise MlxLocalError(
                f"config.json: {key} is {str(value)[:40]!r}, not a positive integer; "
                "fix the config or re-download the checkpoint"
            )
    held = longest_numbered_list(shapes)
    weights = sum(math.prod(shape) for shape in shapes.values())
    for key in _LAYER_KEYS:
        if config.get(key, 0) > held:
            raise MlxLocalError(
                f"config.json: {key} is {config[key]} but the weight files hold at most "
                f"{held} numbered layers; is config.json from the same checkpoint?"
            )
        # Each layer built costs ~85 KB however small its tensors: names of many tiny layers
        # in a header must not make a small file build gigabytes of empty layers.
        if config.get(key, 0) * MIN_LAYER_WEIGHTS > weights:
            raise MlxLocalError(
                f"config.json: {key} is {config[key]} but the weight files hold only {weights} "
                f"weights in all, fewer than {MIN_LAYER_WEIGHTS} per layer; the files are not a "
                "model's — re-download the checkpoint"
            )
    largest = max((max(shape, default=0) for shape in shapes.values()), default=0)
    for key in ("hidden_size", "vocab_size"):
        if config.get(key, 0) > largest:
            raise MlxLocalError(
                f"config.json: {key} is {config[key]} but no tensor in the weight files has a "
                f"dimension above {largest}; is config.json from the same checkpoint?"
            )


def longest_numbered_list(names: Iterable[str]) -> int:
    """The most distinct numbers under one prefix (`model.layers.N.`, `blk.N.`, `h.N.`…)."""
    found: dict[str, set[str]] = defaultdict(set)
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                found[".".join(parts[:i])].add(part)
    return max(map(len, found.values()), default=0)


def check_quantization(config: dict[str, Any]) -> dict[str, Any]:
    """`config` when its `quantization` block (if any) is one mlx-lm can apply: a mapping with
    bits 1-8 and a positive group size, per-layer overrides likewise."""
    quant = config.get("quantization")
    if quant is None:
        return config
    blocks = [("quantization", quant)]
    if isinstance(quant, dict):
        blocks += [(f"quantization.{k}", v) for k, v in quant.items() if isinstance(v, dict)]
    for where, block in blocks:
        if not isinstance(block, dict):
            raise MlxLocalError(
                f"config.json: {where} is {str(block)[:40]!r}, not a block like "
                '{"bits": 4, "group_size": 64}; fix the config or re-quantize the model'
            )
        for key, low, high in (("bits", 1, 8), ("group_size", 1, 1 << 20)):
            value = block.get(key, quant.get(key))
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise MlxLocalError(
                    f"config.json: {where}.{key} is {str(value)[:40]!r}, not an integer from "
                    f"{low} to {high}; fix the config or re-quantize the model"
                )
    return config


def normalize_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rewrite Hugging Face config drift that mlx-lm would silently misread.

    Returns the fixed config and one line per fix, for the user to see.
    """
    config = copy.deepcopy(config)
    notes: list[str] = []
    _lift_rope_parameters(config, notes)
    return config, notes


def _lift_rope_parameters(config: dict[str, Any], notes: list[str]) -> None:
    # transformers 5 writes `rope_parameters`; mlx-lm reads `rope_theta`/`rope_scaling` and
    # falls back to rope_theta=10000 without a word when they are missing.
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return
    if all(isinstance(v, dict) for v in params.values()):
        # Per layer type (Gemma 3 style): full attention carries the global settings.
        full = params.get("full_attention") or next(iter(params.values()))
        local = params.get("sliding_attention")
        if local and "rope_theta" in local and "rope_local_base_freq" not in config:
            config["rope_local_base_freq"] = local["rope_theta"]
            notes.append(f"rope_local_base_freq={local['rope_theta']} from rope_parameters")
        params = full
    if "rope_theta" in params and "rope_theta" not in config:
        config["rope_theta"] = params["rope_theta"]
        notes.append(f"rope_theta={params['rope_theta']} from rope_parameters")
    if "partial_rotary_factor" in params and "partial_rotary_factor" not in config:
        config["partial_rotary_factor"] = params["partial_rotary_factor"]
        notes.append(
            f"partial_rotary_factor={params['partial_rotary_factor']} from rope_parameters"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" and not config.get("rope_scaling"):
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta",)}
        scaling["rope_type"] = scaling["type"] = rope_type
        config["rope_scaling"] = scaling
        notes.append(f"rope_scaling ({rope_type}) from rope_parameters")


def ignored_settings(config: dict[str, Any], args_class: type) -> list[str]:
    """Warnings for config settings the mlx-lm architecture has no field for, so drops silently."""
    fields = set(getattr(args_class, "__dataclass_fields__", {}))
    window = config.get("sliding_window")
    if not window or not config.get("use_sliding_window", True):
        return []
    # Llama-style classes apply the window only to layers that `layer_types` marks as sliding
    # (and need one full-attention layer, so an all-sliding Mistral cannot be expressed).
    by_layer = "layer_types" in fields
    honoured = "sliding_window" in fields and (
        not by_layer or "sliding_attention" in (config.get("layer_types") or [])
    )
    if not honoured:
        return [
            f"mlx-lm's {config['model_type']} ignores sliding_window={window}: outputs for "
            f"sequences longer than {window} tokens will differ from transformers"
        ]
    return []


def source_dtype(config: dict[str, Any]) -> str | None:
    """The dtype a config declares (transformers 5 writes `dtype`, older ones `torch_dtype`)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if cfg.get(key) in DTYPES:
                return cfg[key]
    return None


def context_length(config: dict[str, Any]) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "n_ctx", "seq_length"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


# Code shipped with a checkpoint (auto_map) never runs: transformers then neither asks nor runs it.
NO_REMOTE_CODE = {"trust_remote_code": False}


# The keys of tokenizer_config.json that mlx-lm turns into a module name and imports.
_NAMED_MODULES = {
    "tool_parser_type": "mlx_lm.tool_parsers",
    "chat_template_type": "mlx_lm.chat_templates",
}


def _named_key(error: Exception) -> str | None:
    """The tokenizer_config.json key whose module mlx-lm failed to import, if that failed."""
    return next((k for k, pkg in _NAMED_MODULES.items() if f"{pkg}." in str(error)), None)


def _known_modules(key: str) -> list[str]:
    package = importlib.import_module(_NAMED_MODULES[key])
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__))


def tokenizer_module_problem(path: str | Path) -> str | None:
    """What is wrong with a tokenizer_config.json key that mlx-lm imports as a module
    (`tool_parser_type`, `chat_template_type`) when it names none mlx-lm has, else None.

    convert and quantize copy tokenizer files unread, so without this check their output would
    fail in every verb that loads it; GGUF export, which carries neither key, only notes it.
    """
    file = Path(path) / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        settings = read_json(file, "tokenizer config")
    except MlxLocalError:
        return None  # loading it says what is wrong
    for key in _NAMED_MODULES:
        value = settings.get(key)
        if value is None or (key == "chat_template_type" and not value):
            continue  # what mlx-lm skips
        known = _known_modules(key)
        if value not in known:
            return (
                f"{file}: {key} is {_shown(value)}, which names nothing mlx-lm has; use one of "
                f"{', '.join(known)}, or remove the key"
            )
    return None


def check_tokenizer_modules(path: str | Path) -> None:
    """Refuse a checkpoint whose tokenizer_config.json names an mlx-lm module it lacks."""
    if problem := tokenizer_module_problem(path):
        raise MlxLocalError(problem)


def _cannot_load(path: str | Path, what: str, error: Exception) -> MlxLocalError:
    if key := _named_key(error):
        return MlxLocalError(
            f"{path}: tokenizer_config.json's {key} names nothing mlx-lm has "
            f"({' '.join(str(error).split())}); use one of {', '.join(_known_modules(key))}, "
            "or remove the key"
        )
    if "trust_remote_code" in str(error):
        return MlxLocalError(
            f"{path}: its {what} needs code shipped with the checkpoint (auto_map), which "
            "mlxlocal never runs; use a checkpoint that transformers supports without it"
        )
    if found := file_at_fault(Path(path), error):
        return found
    problem = " ".join(str(error).split())  # mlx-lm may list thousands of tensor names
    problem = problem if len(problem) <= 300 else problem[:300] + "…"
    return MlxLocalError(f"{path}: cannot load the {what} ({problem})")


# Files transformers and mlx-lm parse while loading a tokenizer, besides config.json (read first).
_TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


def file_at_fault(path: Path, error: Exception) -> MlxLocalError | None:
    """After a failed load, the file (and key) to blame, when it can be named: a tokenizer
    file that is not valid JSON, or a config dtype that names no torch dtype. Read only on
    failure: a good load pays nothing."""
    for name in _TOKENIZER_JSON:
        if (path / name).is_file():
            try:
                read_json(path / name, name.removesuffix(".json").replace("_", " "))
            except MlxLocalError as e:
                return e
    bad = str(error).removeprefix("module 'torch' has no attribute ")
    if isinstance(error, AttributeError) and bad != str(error):
        config = read_config(path)
        key = next((k for k in ("dtype", "torch_dtype") if repr(config.get(k)) == bad), None)
        if key is not None:
            return MlxLocalError(
                f"{path / 'config.json'}: {key} is {bad}, which names no torch dtype; write "
                f"one of {', '.join(sorted(DTYPES))}"
            )
    return None


def load_tokenizer(path: str | Path):
    """mlx-lm's tokenizer wrapper for a checkpoint directory, without checkpoint code."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    config = read_config(Path(path))
    with _loading(path, "tokenizer"):
        return mlx_load_tokenizer(
            Path(path), NO_REMOTE_CODE, eos_token_ids=config.get("eos_token_id")
        )


@contextmanager
def _loading(path: str | Path, what: str) -> Iterator[None]:
    """mlx-lm's and transformers' load failures as one-line errors naming `what`."""
    try:
        yield
    except (OSError, ValueError, KeyError, ImportError, RecursionError) as e:
        raise _cannot_load(path, what, e) from e  # RecursionError: JSON nested past the limit
    except AttributeError as e:
        # A tool_parser_type naming a module that is no parser, or a config value transformers
        # looks up by name (`"dtype": "Float32"` → torch.Float32).
        raise _cannot_load(path, what, e) from e


def hf_tokenizer(path: str | Path):
    """The transformers tokenizer of a checkpoint directory, without checkpoint code."""
    from transformers import AutoTokenizer

    with _loading(path, "tokenizer"):
        return AutoTokenizer.from_pretrained(str(path), **NO_REMOTE_CODE)


def load(path: str | Path, adapter: str | Path | None = None, lazy: bool = False):
    """(model, tokenizer) from an MLX checkpoint directory, through mlx-lm.

    Adapters go through mlxlocal's loader (ours, mlx-lm's or a PEFT folder, applied in memory;
    unlike mlx-lm's it takes DoRA over 3-, 5- and 6-bit bases); `lazy` leaves weights unread
    until first used.
    """
    from mlx_lm import load as mlx_load

    path = Path(path)
    config = read_config(path)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise MlxLocalError(
            f"{path}: no model*.safetensors; convert it first with `mlxlocal convert`"
        )
    check_config_sizes(config, {k: e["shape"] for f in files for k, e in read_header(f)[0].items()})
    check_rope_built(config)
    with _loading(path, "model or tokenizer"):
        model, tokenizer = mlx_load(str(path), tokenizer_config=NO_REMOTE_CODE, lazy=lazy)
    own_rope(model, config)
    if adapter:
        load_adapters(model, adapter)
        model.eval()
    return model, tokenizer
