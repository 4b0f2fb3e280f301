"""The checks a run makes before it trains, shared by `run` and `recipes validate`.

`recipes validate` saying ok must mean `run` gets past its checks: both call `preflight`, which
reads and renders the data with the model's tokenizer (no weights loaded), checks the eval
settings against the data (labels, a task that needs answers), the usable rows, the lengths
against the model's context and the steps the data gives. What needs the weights in memory
(`training.loss_chunk_size` against the architecture's output head, LoRA target modules) is
checked by `run` right after loading, before any training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DataReport, Example, describe_dataset, load_examples
from ..errors import MlxLocalError
from ..evaluate import answered_samples, check_labels, preference_pairs
from ..models import context_length
from ..recipe import Recipe, dump_recipe, load_recipe
from .batches import num_batches
from .checkpoints import RunDir
from .preference import check_reference


@dataclass
class Checked:
    """What the checks read: the examples training uses and the steps they give."""

    examples: list[Example]
    report: DataReport
    valid_examples: list[Example]
    valid_report: DataReport
    capacity: int  # the longest packed row
    total_steps: int

    def lines(self) -> list[str]:
        """What `recipes validate` reports: the steps, the tokens, then each file's examples."""
        lines = [f"training: {self.total_steps} steps"]
        splits = [("train", self.report)]
        splits += [("valid", self.valid_report)] if self.valid_examples else []
        for split, r in splits:
            changed = [
                f"{n:,} {what}"
                for n, what in ((r.truncated, "truncated"), (r.dropped, "dropped"))
                if n
            ]
            lines.append(
                f"tokens {split}: {r.tokens:,}, {r.trained_tokens:,} trained"
                + "".join(f", {c}" for c in changed)
            )
        for split, r in splits:
            skipped = f", {r.bad_lines} bad lines skipped" if r.bad_lines else ""
            lines.append(f"data {split}: {r.file}: {r.examples:,} examples ({r.format}){skipped}")
        return lines


def preflight(
    recipe: Recipe,
    base: Path,
    tokenizer: Any,
    config: dict[str, Any],
    note: Callable[[str], None],
    world_size: int = 1,
) -> Checked:
    """Every check `run` makes before loading weights; raises the first failure. `base` is
    the model's folder. With `world_size` ranks a step takes grad_accumulation micro-batches
    on each."""
    check_model(recipe, config)
    if recipe.method.objective == "dpo":
        check_reference(recipe.method.reference, base, config, tokenizer)
    check_eval(recipe, tokenizer, note)
    examples, report = load_examples(recipe.data, tokenizer, "train", note)
    valid_examples, valid_report = load_examples(recipe.data, tokenizer, "valid", note)
    objective = recipe.method.objective
    if (objective == "sft") == (report.format == "preference"):
        raise MlxLocalError(
            f"method.objective: {objective} cannot train on {report.format} data; "
            + (
                "set method.objective: dpo, orpo or simpo"
                if objective == "sft"
                else "give prompt/chosen/rejected rows (data.format: preference)"
            )
        )
    # Packed rows no longer than the longest example: no batch outgrows the unpacked worst case.
    capacity = min(recipe.data.max_length, max(len(e.tokens) for e in examples + valid_examples))
    context = context_length(config)
    if context and capacity > context:
        raise MlxLocalError(
            f"data.max_length: {recipe.data.max_length} lets examples of {capacity} tokens "
            f"through, above the model's context of {context} tokens; set data.max_length: "
            f"{context} or less"
        )
    total_steps = recipe.training.steps or epoch_steps(examples, recipe, capacity, world_size)
    return Checked(examples, report, valid_examples, valid_report, capacity, total_steps)


def check_model(recipe: Recipe, config: dict[str, Any]) -> None:
    """The recipe against the model's config: layers and quantization."""
    count = config.get("num_hidden_layers") or config.get("n_layer")
    layers = recipe.method.layers
    if count and layers != "all":
        too_many = layers > count if isinstance(layers, int) else max(layers, default=0) >= count
        if too_many:
            raise MlxLocalError(
                f"method.layers: {layers} does not fit the model's {count} layers "
                f"(indices 0..{count - 1})"
            )
    quantized = "quantization" in config
    if quantized and recipe.model.quantize is not None:
        raise MlxLocalError(
            f"model.quantize: {recipe.model.path} is already quantized; remove model.quantize"
        )
    if quantized and recipe.method.type == "full":
        raise MlxLocalError(
            f"method.type full: {recipe.model.path} is quantized and quantized weights cannot be "
            "trained; use a float model, or method.type lora (QLoRA)"
        )


def check_eval(recipe: Recipe, tokenizer: Any, note: Callable[[str], None]) -> None:
    """The eval section against its data: rows with answers, labels that occur in it."""
    e = recipe.eval
    if e.task is None:
        return
    section = recipe.data.model_copy(
        update={"train": e.data or recipe.data.valid, "valid": None, "valid_fraction": None}
    )
    if e.task == "perplexity":
        load_examples(section, tokenizer, "train", note)
        return
    if e.task == "preference":
        preference_pairs(section, tokenizer, note)
        return
    samples = answered_samples(section, e.task, e.limit, note)
    if e.task == "classify":
        gold = [str(s.messages[-1]["content"]).strip() for s in samples]
        check_labels(tokenizer, section.train, gold, e.labels)


def epoch_steps(examples: list, recipe: Recipe, capacity: int, world_size: int = 1) -> int:
    t, d = recipe.training, recipe.data
    per_step = t.grad_accumulation * world_size
    count = sum(
        num_batches(examples, t.batch_size, capacity, d.packing, t.seed, e) for e in range(t.epochs)
    )
    if count < per_step:
        ranks = f" × {world_size} ranks" if world_size > 1 else ""
        raise MlxLocalError(
            f"the training data gives {count} batches, fewer than one step needs "
            f"(training.grad_accumulation = {t.grad_accumulation}{ranks}): add examples"
        )
    return count // per_step


def validate_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    note: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """Check a recipe without running it: everything `run` checks before training.

    Returns what was checked. A Hub model that is not in the cache is not downloaded: the
    checks that need its tokenizer are then left to `run` (the report says so).
    """
    from ..models import load_tokenizer, read_config
    from ..sources import is_hub_id, is_offline, resolve_source

    recipe = load_recipe(path, overrides)
    report = [f"{path}: the schema is valid (method {recipe.method.type})"]
    replaced = RunDir(Path(recipe.output).expanduser()).check(
        dump_recipe(recipe), None, recipe.training.steps
    )
    report.append(f"output {recipe.output}: " + (replaced or "ok"))
    model = recipe.model.path
    try:
        folder = resolve_source(model, recipe.model.revision, download=False)
    except MlxLocalError:
        if not is_hub_id(model):
            raise
        if is_offline():
            raise MlxLocalError(
                f"{model} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: unset "
                "it, or give a local path"
            ) from None
        report.append(f"model {model}: not in the Hugging Face cache; the run downloads it")
        report.append("data and eval: checked without the tokenizer (the run renders them)")
        for split, file in (("train", recipe.data.train), ("valid", recipe.data.valid)):
            if file is not None:
                report.append(f"data {split}: {describe_dataset(recipe.data, file, note)}")
        return report
    config = read_config(folder)
    report.append(f"model {model}: found ({config['model_type']}, {folder})")
    checked = preflight(recipe, folder, load_tokenizer(folder), config, note)
    if recipe.eval.task:
        report.append(f"eval {recipe.eval.task}: ok")
    return report + checked.lines()
