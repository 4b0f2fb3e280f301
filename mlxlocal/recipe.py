"""Recipes: one YAML file holds a whole fine-tuning run.

Errors name the key, its line in the file and, for a typo, the key meant, because a recipe is
edited by hand and a run that fails an hour in on a misspelt key wastes the hour. YAML anchors
and aliases are refused, in files and overrides alike (a few hundred bytes of them can name
billions of nodes).

Paths: `load_recipe` also takes a built-in recipe's name ("tiny-lora"); data paths come back
absolute (or "builtin:NAME"), a relative model path that exists next to the recipe is made
absolute, and paths given as command-line overrides resolve against the current directory.
`eval.task` (perplexity|classify|generate) scores the base model before training and the
trained one after (mlxlocal.evaluate).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .checkpoint.inputs import SafeYAML, load_yaml, read_text
from .data import DataSection
from .errors import MlxLocalError
from .resources import builtin_dir


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quantize(Section):
    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    group_size: Literal[32, 64, 128] = 64


class ModelSection(Section):
    path: str = Field(min_length=1)
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantize: Quantize | None = None


class MethodSection(Section):
    type: Literal["lora", "dora", "full"] = "lora"
    rank: PositiveInt = 8
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = False
    modules: list[str] | None = Field(None, min_length=1)
    layers: Literal["all"] | PositiveInt | list[NonNegativeInt] = "all"
    # What the step minimises: next-token loss (sft), or a preference between two answers
    # (dpo, orpo, simpo; data in the `preference` format). mlxlocal.train.preference.
    objective: Literal["sft", "dpo", "orpo", "simpo"] = "sft"
    beta: float = Field(0.1, gt=0)  # DPO/SimPO temperature, ORPO's weight of the odds term
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # DPO/SimPO: share of flipped labels
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO: the reward margin asked for
    # DPO: what the rewards are measured against: the base (adapters off), or a folder: a
    # model (e.g. the SFT model the policy started from) or adapters applied over the base.
    reference: str = Field("base", min_length=1)

    @field_validator("layers", mode="wrap")
    @classmethod
    def _one_message(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "layers",
                "expected 'all', a count N of last layers (N ≥ 1) or a list of layer indices",
            ) from None


class TrainingSection(Section):
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    optimizer_args: dict[str, Any] = {}
    learning_rate: float = Field(1e-4, gt=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: NonNegativeInt = 0
    min_learning_rate: float = Field(0.0, ge=0)
    batch_size: PositiveInt = 4
    grad_accumulation: PositiveInt = 1
    epochs: PositiveInt | None = None
    steps: PositiveInt | None = None
    grad_clip: float | None = Field(None, gt=0)
    grad_checkpoint: bool = False
    loss_chunk_size: PositiveInt | None = None
    seed: NonNegativeInt = 0
    compile: bool = True


class EvalSection(Section):
    every: PositiveInt | None = None
    batches: PositiveInt | None = None
    task: Literal["perplexity", "classify", "generate", "preference"] | None = None
    data: str | None = None
    labels: list[str] | None = Field(None, min_length=2)
    limit: PositiveInt | None = None


class CheckpointSection(Section):
    every: PositiveInt | None = None
    keep: PositiveInt = 3


class Recipe(Section):
    model: ModelSection
    data: DataSection
    method: MethodSection = MethodSection()
    training: TrainingSection
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    output: str = Field(min_length=1)

    @model_validator(mode="after")
    def _possible(self) -> Recipe:
        problem = _impossible_combination(self)
        if problem:
            key, message = problem
            raise PydanticCustomError(
                "combination", "{key}: {message}", {"key": key, "message": message}
            )
        if self.method.objective != "sft":
            self.data.packing = False  # both answers of a pair go to one batch, unpacked
        return self


def _impossible_combination(r: Recipe) -> tuple[str, str] | None:
    """The first setting that contradicts another, as (key path, what to do)."""
    t, m = r.training, r.method
    if t.epochs is not None and t.steps is not None:
        return "training.steps", "set training.epochs or training.steps, not both"
    if t.epochs is None and t.steps is None:
        return "training", "set training.epochs or training.steps to say how long to train"
    if t.steps is not None and t.warmup_steps >= t.steps:
        return "training.warmup_steps", f"{t.warmup_steps} warmup steps leave none of {t.steps}"
    if t.min_learning_rate > t.learning_rate:
        return "training.min_learning_rate", "is above training.learning_rate; lower it"
    if t.min_learning_rate and t.schedule == "constant":
        return "training.min_learning_rate", "only cosine and linear schedules decay to it"
    unknown = set(t.optimizer_args) - set(optimizer_arguments(t.optimizer))
    if unknown:
        name = sorted(unknown)[0]
        hint = _did_you_mean(name, optimizer_arguments(t.optimizer))
        return f"training.optimizer_args.{name}", f"not an argument of {t.optimizer}; {hint}"
    if r.data.valid is not None and r.data.valid_fraction is not None:
        return "data.valid_fraction", "set data.valid or data.valid_fraction, not both"
    if r.eval.every and r.data.valid is None and r.data.valid_fraction is None:
        return "eval.every", "needs validation data: set data.valid or data.valid_fraction"
    if r.eval.task and r.eval.data is None and r.data.valid is None:
        return "eval.data", "eval.task needs held-out data: set eval.data or data.valid"
    if r.eval.task is None and (r.eval.data or r.eval.labels or r.eval.limit):
        return "eval.task", "set it (perplexity, classify, generate or preference) to use eval.data"
    if m.type == "full" and r.model.quantize is not None:
        return (
            "model.quantize",
            "full fine-tuning cannot train quantized weights; remove model.quantize or use "
            "method.type: lora (QLoRA)",
        )
    if m.type == "full":
        for key in ("rank", "alpha", "dropout", "rslora"):
            if key in m.model_fields_set:
                return f"method.{key}", "applies to lora and dora, not to method.type: full"
    # Set to other than the default (a resolved recipe, written back, holds every default).
    changed = {k for k in m.model_fields_set if getattr(m, k) != type(m).model_fields[k].default}
    if "reference" in changed and m.objective != "dpo":
        return "method.reference", "applies to objective dpo only (the others have none)"
    if m.objective == "sft":
        for key in ("beta", "label_smoothing", "simpo_gamma"):
            if key in changed:
                return f"method.{key}", "applies to preference objectives (dpo, orpo, simpo)"
    else:
        only = {"label_smoothing": ("dpo", "simpo"), "simpo_gamma": ("simpo",)}
        for key, objectives in only.items():
            if key in changed and m.objective not in objectives:
                return f"method.{key}", f"applies to objective {' and '.join(objectives)} only"
        if r.data.format not in ("auto", "preference"):
            return "data.format", f"objective {m.objective} trains on preference data"
        if r.data.packing and "packing" in r.data.model_fields_set:
            return "data.packing", "preference pairs are not packed; remove it"
        if r.eval.task not in (None, "preference"):
            return "eval.task", f"objective {m.objective} is scored by task preference"
    if isinstance(m.layers, list) and len(set(m.layers)) != len(m.layers):
        return "method.layers", "lists a layer twice"
    return None


def optimizer_arguments(name: str) -> list[str]:
    """Keyword arguments of the MLX optimizer a recipe names (besides the learning rate)."""
    import mlx.optimizers as optim

    cls = {"adamw": optim.AdamW, "adam": optim.Adam, "sgd": optim.SGD}.get(name, optim.Adafactor)
    return [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "learning_rate")
    ]


# --- reading YAML with line numbers -------------------------------------------------------------


class _Loader(SafeYAML):
    """YAML 1.1 reads `1e-4` as a string; a recipe means a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

Path_ = tuple[Any, ...]


def _parse(text: str, where: str) -> tuple[Any, dict[Path_, int]]:
    """The YAML document and the line of every key and list item in it."""
    data, node = load_yaml(text, where, "recipes", _Loader)
    lines: dict[Path_, int] = {}
    if node is not None:
        _index_lines(node, (), lines, where)
    return data, lines


def _index_lines(node: yaml.Node, path: Path_, lines: dict[Path_, int], where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            name = key.value
            if name in seen:
                line = key.start_mark.line + 1
                dotted = ".".join(map(str, (*path, name)))
                raise MlxLocalError(f"{where}:{line}: {dotted}: duplicate key; keep one")
            seen.add(name)
            lines[(*path, name)] = key.start_mark.line + 1
            _index_lines(value, (*path, name), lines, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _index_lines(item, (*path, i), lines, where)


def _apply_override(data: dict[str, Any], override: str) -> Path_:
    """Set `key.path=value` (value read as YAML) in `data`; return the key path."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise MlxLocalError(f"override {override!r}: expected key.path=value")
    path = tuple(key.strip().split("."))
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: i + 1])
            raise MlxLocalError(f"override {override!r}: {dotted} is a value, not a section")
        node = child
    # An error echoes the override, cut short: a hostile one can be 50,000 characters.
    shown = override if len(override) <= 80 else override[:80] + "…"
    node[path[-1]] = load_yaml(value, f"override {shown!r}", "overrides", _Loader, lines=False)[0]
    return path


# --- turning pydantic's errors into one line ----------------------------------------------------


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "expected one of: " + ", ".join(choices)


def _section_class(path: Path_) -> type[BaseModel] | None:
    """The schema class of the section at `path`, to suggest the key a typo meant."""
    cls: Any = Recipe
    for part in path:
        field = cls.model_fields.get(part) if isinstance(cls, type) else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        cls = next(
            (a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if cls is None:
            return None
    return cls


def _data_path(loc: tuple, data: Any) -> Path_:
    """pydantic's error location as a path into the data (dropping union member tags)."""
    path: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif i == len(loc) - 1 and part != "[key]":
            path.append(part)  # a missing key
            break
        else:
            continue
        path.append(part)
    return tuple(path)


def _describe(error: dict[str, Any], path: Path_) -> tuple[Path_, str]:
    kind, value = error["type"], error.get("input")
    if kind == "combination":
        return tuple(error["ctx"]["key"].split(".")), error["ctx"]["message"]
    if kind == "extra_forbidden":
        section = _section_class(path[:-1])
        return path, "unknown key; " + _did_you_mean(
            path[-1], list(section.model_fields) if section else []
        )
    if kind == "missing":
        return path, "required but missing"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"]) or [
            c.strip() for c in re.split(r",| or ", error["ctx"]["expected"])
        ]
        if error["loc"][-1] == "[key]":
            return path, f"{value!r} is not a field name; " + _did_you_mean(value, choices)
        return path, f"{value!r} is not allowed; " + _did_you_mean(str(value), choices)
    if kind in ("model_type", "dict_type"):
        got = "nothing" if value is None else repr(value)
        return path, f"expected a section of keys, got {got}"
    message = error["msg"]
    return path, f"{message[0].lower()}{message[1:]} (got {value!r})"


def _first_error(
    e: ValidationError, data: Any, lines: dict[Path_, int], where: str, overridden: list[Path_]
) -> MlxLocalError:
    problems = []
    for error in e.errors():
        path, message = _describe(error, _data_path(error["loc"], data))
        # The line of the key, or of the nearest section above it that the file has.
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), 0)
        from_command_line = any(
            path[: len(o)] == o or (o[: len(path)] == path and path not in lines)
            for o in overridden
        )
        location = "command line" if from_command_line else f"{where}:{line}" if line else where
        dotted = ".".join(map(str, path)) or "recipe"
        problems.append((from_command_line, line, f"{location}: {dotted}: {message}"))
    problems.sort(key=lambda p: p[:2])
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return MlxLocalError(problems[0][2] + (more if len(problems) > 1 else ""))


# --- loading ------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file (or a built-in recipe named by `path`)."""
    file, where = Path(path).expanduser(), str(path)
    if not file.exists():
        file = builtin_recipe_path(str(path), missing=f"{path}: no such recipe file")
        where = file.name
    data, lines = _parse(read_text(file, "recipe"), where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MlxLocalError(f"{where}:1: a recipe is a mapping of sections (model, data, ...)")
    overridden = [_apply_override(data, o) for o in overrides]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _first_error(e, data, lines, where, overridden) from None
    _resolve_paths(recipe, file.resolve().parent, overridden)
    return recipe


def _resolve_paths(recipe: Recipe, folder: Path, overridden: list[Path_]) -> None:
    def base(*key: str) -> Path:
        return Path.cwd() if any(key[: len(o)] == o for o in overridden) else folder

    d = recipe.data
    d.train = _resolve(d.train, base("data", "train"))
    if d.valid is not None:
        d.valid = _resolve(d.valid, base("data", "valid"))
    if recipe.eval.data is not None:
        recipe.eval.data = _resolve(recipe.eval.data, base("eval", "data"))
    m = recipe.method
    if m.reference != "base":
        m.reference = _resolve(m.reference, base("method", "reference"))
    local = base("model", "path") / Path(recipe.model.path).expanduser()
    if not recipe.model.path.startswith("builtin:") and local.exists():
        recipe.model.path = str(local.resolve())


def _resolve(value: str, folder: Path) -> str:
    if value.startswith("builtin:"):
        return value
    # Absolute, but links kept: errors then name the file the user gave, not its target.
    return os.path.abspath(folder / Path(value).expanduser())


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, every default filled in (what a run directory keeps)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --- built-in recipes ---------------------------------------------------------------------------


@dataclass
class BuiltinRecipe:
    name: str
    purpose: str
    path: Path


def builtin_recipes() -> list[BuiltinRecipe]:
    """The recipes installed with mlxlocal, with the purpose their headers state."""
    return [_describe_builtin(p) for p in sorted(builtin_dir("recipes").glob("*.yaml"))]


def _describe_builtin(path: Path) -> BuiltinRecipe:
    header: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line.lstrip("# ").partition(":")
        if sep:
            header.setdefault(key.strip().lower(), value.strip())
    return BuiltinRecipe(path.stem, header.get("purpose", ""), path)


def builtin_recipe_path(name: str, missing: str | None = None) -> Path:
    """The file of the built-in recipe `name` (with or without .yaml)."""
    stem = name.removesuffix(".yaml")
    path = builtin_dir("recipes") / f"{stem}.yaml"
    if path.exists() and "/" not in stem:
        return path
    names = [r.name for r in builtin_recipes()]
    hint = _did_you_mean(stem, names)
    raise MlxLocalError(f"{missing or f'{name}: no such built-in recipe'}; {hint}")


def show_recipe(name: str) -> str:
    return builtin_recipe_path(name).read_text()


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    """Copy a built-in recipe to `dest` (a file, or a folder to put `<name>.yaml` in) to edit."""
    from .checkpoint.atomic import atomic_file

    source = builtin_recipe_path(name)
    out = Path(dest).expanduser()
    if out.is_dir():
        out = out / source.name
    with atomic_file(out, force=force) as tmp:
        tmp.write_text(source.read_text())
    return out


def format_recipe_table(recipes: list[BuiltinRecipe], memory: dict[str, str]) -> str:
    """NAME, MEMORY, PURPOSE columns; memory: the computed estimates by name."""
    rows = [("NAME", "MEMORY", "PURPOSE")]
    rows += [(r.name, memory.get(r.name, "?"), r.purpose) for r in recipes]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows)
