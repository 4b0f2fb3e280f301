"""`mlxlocal run RECIPE`: a recipe in; a run directory with checkpoints and adapters out."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..adapters.files import adapter_config
from ..adapters.formula import lora_scale
from ..adapters.layers import (
    adapter_keys,
    add_adapters,
    base_quantization,
    default_modules,
    resolve_layers,
    save_adapters,
)
from ..checkpoint.atomic import atomic_directory
from ..checkpoint.dtypes import DTYPES, compute_dtype
from ..checkpoint.jsonout import strict_dumps
from ..convert import convert
from ..errors import MlxLocalError
from ..evaluate import EvalResult, evaluate_recipe, side_by_side
from ..models import load, load_tokenizer, read_config
from ..quant_plan import DEFAULT_KEEP_HIGH, KEEP, check_spec, plan_layers
from ..ranks import World, init
from ..recipe import Quantize, Recipe, dump_recipe
from ..resources import family_spec
from ..sources import resolve_source
from .batches import iterate_batches, iterate_pair_batches
from .checkpoints import (
    Position,
    RunDir,
    read_position,
    restore_checkpoint,
    rng_key,
    write_text_atomic,
)
from .loss import check_output_head
from .optim import build_optimizer
from .preference import BASE, Objective, ReferenceCache, load_reference, with_reference
from .preflight import preflight
from .trainer import BatchStream, TrainResult, train


@dataclass
class RunSummary:
    output: Path
    adapters: Path
    method: str
    total_steps: int
    resumed_from: int | None
    training: TrainResult
    trainable_parameters: int
    parameters: int
    data: list[str] = field(default_factory=list)  # what was read from each data file
    before: EvalResult | None = None  # the recipe's task evaluation, when it has one
    after: EvalResult | None = None
    next: list[str] = field(default_factory=list)  # commands that use what the run made
    report: Path | None = None  # the run's HTML report
    world_size: int = 1  # ranks that trained together
    rank: int = 0  # this process's (only rank 0 wrote the run directory)

    def lines(self) -> list[str]:
        """What the CLI prints when the run ends."""
        r = self.training
        val = f", validation loss {r.val_loss:.4f}" if r.val_loss is not None else ""
        resumed = f" (resumed at step {self.resumed_from})" if self.resumed_from else ""
        ranks = f" (the most of {self.world_size} ranks)" if self.world_size > 1 else ""
        return [
            *self.data,
            f"trained {self.method} for {self.total_steps} steps{resumed}: "
            f"final loss {r.loss:.4f}{val}",
            f"{r.trained_tokens:,} tokens, {r.tokens_per_s:,.0f} tokens/s, "
            f"peak memory {r.peak_memory_gb:.2f} GB{ranks}, {r.elapsed_s:.1f} s training",
            f"trainable parameters: {self.trainable_parameters:,} of {self.parameters:,}",
            f"adapters: {self.adapters}  (metrics: {self.output / 'metrics.jsonl'})",
            *(side_by_side(self.before, self.after) if self.before and self.after else []),
            *([f"report: {self.report}"] if self.report else []),
            *(["next:", *(f"  {command}" for command in self.next)] if self.next else []),
        ]

    def to_json(self) -> dict[str, Any]:
        """summary.json: the numbers, with the task metrics before and after (the examples
        scored are in evaluation.json)."""
        scores = None
        if self.before and self.after:
            scores = {"task": self.before.task, "data": self.before.data}
            scores |= {"before": self.before.metrics, "after": self.after.metrics}
        return {
            "output": str(self.output),
            "adapters": str(self.adapters),
            "method": self.method,
            "total_steps": self.total_steps,
            "resumed_from": self.resumed_from,
            "training": asdict(self.training),
            "trainable_parameters": self.trainable_parameters,
            "parameters": self.parameters,
            "data": self.data,
            "evaluation": scores,
            "world_size": self.world_size,
        }


def load_base(recipe: Recipe, run_dir: Path, echo: Callable[[str], None]) -> tuple[Any, Any, Path]:
    """(model, tokenizer, MLX checkpoint path): HF checkpoints are converted into the run dir."""
    dtype = compute_dtype(recipe.model.dtype)
    src = resolve_source(recipe.model.path, recipe.model.revision)
    config = read_config(src)
    if "mlxlocal" in config or "quantization" in config:
        path = src
    else:
        path = run_dir / "model"
        if not (path / "config.json").exists():
            echo(f"converting {recipe.model.path} to MLX ({dtype}) into {path}")
            convert(src, path, dtype=dtype, revision=recipe.model.revision, force=True)
    model, tokenizer = load(path, lazy=True)
    model.set_dtype(DTYPES[dtype])
    if recipe.model.quantize is not None:  # (on a float model: preflight.check_model)
        quantize_for_training(model, recipe.model.quantize)
    mx.eval(model.parameters())
    return model, tokenizer, path


def quantize_for_training(model: nn.Module, quantize: Quantize) -> None:
    """Quantize a float model in memory for QLoRA.

    The plan `mlxlocal quantize` makes, with a rule keeping the family's keep_high_precision
    layers in float (QLoRA's choice); widths the group size does not divide get a group.
    """
    keep = (family_spec(model.model_type) or {}).get("keep_high_precision", DEFAULT_KEEP_HIGH)
    layers = plan_layers(
        model,
        check_spec(quantize.bits, quantize.group_size, "affine"),
        weights=dict(tree_flatten(model.parameters())),
        rules=[(rf"(^|\.)({'|'.join(map(re.escape, keep))})$", str(KEEP))],
    )
    specs = {layer.path: layer.spec for layer in layers}
    nn.quantize(model, class_predicate=lambda p, _: specs[p].config() if specs.get(p) else False)


def prepare_method(model: nn.Module, recipe: Recipe, base: Path) -> dict[str, Any]:
    """Make the recipe's parameters trainable (adapters or weights); return adapter_config."""
    m = recipe.method
    n = len(model.layers)
    layers = resolve_layers(m.layers, n)
    q = recipe.model.quantize
    extra: dict[str, Any] = {"model": str(base), "quantize": q.model_dump() if q else None}
    if q is not None:  # what loading these adapters over the float base must redo (QLoRA)
        base_quant = base_quantization(model)
        extra["base"] = {"dtype": compute_dtype(recipe.model.dtype), "quantization": base_quant}
    if m.type == "full":
        if any(isinstance(x, nn.QuantizedLinear) for _, x in model.named_modules()):
            raise MlxLocalError(
                f"method.type full: {base} is quantized and quantized weights cannot be trained; "
                "use a float model, or method.type lora (QLoRA)"
            )
        if m.layers == "all":
            model.unfreeze()
        else:
            model.freeze()
            for i in layers:
                model.layers[i].unfreeze()
        return adapter_config("full", layers, n, extra=extra)
    keys = adapter_keys(
        [model.layers[i] for i in layers], m.modules or default_modules(model.model_type)
    )
    scale = lora_scale(m.alpha, m.rank, m.rslora)
    add_adapters(model, m.type, m.rank, scale, m.dropout, keys, layers)
    return adapter_config(
        m.type,
        layers,
        n,
        rank=m.rank,
        scale=scale,
        dropout=m.dropout,
        keys=keys,
        alpha=m.alpha,
        rslora=m.rslora,
        extra=extra,
    )


def run_recipe(
    recipe: Recipe,
    resume: bool | None = None,
    echo: Callable[[str], None] = lambda _: None,
    extend: int | None = None,
) -> RunSummary:
    """Train what `recipe` says into its output directory, resuming a killed run exactly.

    `resume` None continues from the newest complete checkpoint when there is one; True
    insists on one; False is not offered (delete the output directory to start over).
    `extend` N continues the finished run in the output for N more steps, as if its
    `training.steps` had been N higher (raising `training.steps` does the same). Ctrl-C stops
    after the step under way, checkpointed (`trainer.Interrupted`).

    Started by `mlx.launch` (N ranks), the ranks train data-parallel (train/distributed.py):
    rank 0 prepares and writes the run directory, the others read what it holds.
    """
    world = init()
    if world.size > 1 and recipe.method.objective != "sft":
        raise MlxLocalError(
            f"method.objective {recipe.method.objective} trains on one process for now "
            "(its reference scores are cached per run): run it without --nproc/--hosts"
        )
    run = RunDir(Path(recipe.output).expanduser())
    if not world.main:
        echo = lambda _: None  # noqa: E731  (rank 0 speaks for the run)
        world.barrier()  # rank 0 has prepared the directory
        if extend is not None:  # to the length rank 0 resolved (the summary is gone now)
            steps = {"steps": run.recipe_steps(), "epochs": None}
            recipe = recipe.model_copy(
                update={"training": recipe.training.model_copy(update=steps)}
            )
        ckpt = run.latest()
        if ckpt is None and resume:
            raise MlxLocalError(f"--resume: rank {world.rank} finds no checkpoint in {run.path}")
        return _run(recipe, run, ckpt, echo, world)
    if extend is not None:
        recipe = extended(recipe, run, extend)
    if (latest := run.latest()) is not None:
        check_world(latest, world)  # before prepare touches the run
    ckpt = run.prepare(dump_recipe(recipe), resume, note=echo, steps=recipe.training.steps)
    forget = run.mark_running()
    try:
        world.barrier()
        return _run(recipe, run, ckpt, echo, world)
    finally:
        forget()


def check_world(ckpt: Path, world: World) -> None:
    """Refuse to resume a checkpoint trained by another number of ranks: its data position
    and global batch mean something else there."""
    saved = read_position(ckpt).world_size
    if saved != world.size:
        how = f"with {saved} ranks (--nproc {saved})" if saved > 1 else "as one process"
        raise MlxLocalError(
            f"{ckpt} was trained by {saved} rank{'s' * (saved > 1)}, this run has {world.size}: "
            f"resume it {how}, or choose another output"
        )


def _run(
    recipe: Recipe, run: RunDir, ckpt: Path | None, echo: Callable[[str], None], world: World
) -> RunSummary:
    from mlx_lm.utils import get_total_parameters, maybe_set_recommended_wired_limit

    from ..report import Refresher

    t = recipe.training
    # The checks `recipes validate` makes, before any weight is converted or loaded.
    src = resolve_source(recipe.model.path, recipe.model.revision)
    if ckpt is not None and not world.main:
        check_world(ckpt, world)
    checked = preflight(recipe, src, load_tokenizer(src), read_config(src), echo, world.size)
    examples, report = checked.examples, checked.report
    valid_examples, valid_report = checked.valid_examples, checked.valid_report
    maybe_set_recommended_wired_limit()
    mx.random.seed(t.seed)
    objective = Objective.of(recipe.method)
    cache = None
    if objective is not None and objective.needs_reference:
        splits = {"train": examples, "valid": valid_examples}
        reference = recipe.method.reference
        cache = ReferenceCache.open(run.path, reference, src, splits, ckpt is not None)
        if cache.missing and reference != BASE:  # loaded alone, scored, freed
            dtype = compute_dtype(recipe.model.dtype)
            scorer = load_reference(reference, dtype, lambda: load_base(recipe, run.path, echo)[0])
            cache.score(scorer, t.batch_size, checked.capacity, echo)
            del scorer
            mx.clear_cache()
    if world.main:
        model, tokenizer, base = load_base(recipe, run.path, echo)
        world.barrier()  # a converted base is whole before the other ranks look for it
    else:
        world.barrier()
        model, tokenizer, base = load_base(recipe, run.path, echo)
    before = evaluate_recipe(recipe, model, tokenizer, base, "before training", echo, world)
    if t.loss_chunk_size is not None:
        check_output_head(model)
    d = recipe.data
    capacity = checked.capacity
    if cache is not None and cache.missing:  # the base's, before any adapter exists
        cache.score(model, t.batch_size, capacity, echo)
    config = prepare_method(model, recipe, base)

    def batches(examples, epoch, start=0):
        if objective is None:
            return iterate_batches(
                examples, t.batch_size, capacity, d.packing, t.seed, epoch, start
            )
        reference = cache.of(examples) if cache is not None else None
        return (
            with_reference(b, reference)
            for b in iterate_pair_batches(examples, t.batch_size, capacity, t.seed, epoch, start)
        )

    stream = BatchStream(lambda e, s: batches(examples, e, s), t.epochs)
    total_steps = checked.total_steps
    optimizer = build_optimizer(t, total_steps)
    optimizer.init(model.trainable_parameters())
    if ckpt is not None:
        position = restore_checkpoint(ckpt, model, optimizer)
        if position.step > total_steps:
            raise MlxLocalError(
                f"{run.path} has trained {position.step} steps, more than the recipe's "
                f"{total_steps}: raise training.steps (or use another output)"
            )
        echo(f"resuming {run.path} from {ckpt.name} (step {position.step} of {total_steps})")
    else:
        position = Position(rng=rng_key())
    resumed_from = position.step or None
    valid = (lambda: batches(valid_examples, 0)) if valid_examples else None
    result = train(
        model,
        optimizer,
        stream,
        total_steps,
        run,
        position,
        config,
        training=t,
        evaluation=recipe.eval,
        checkpoints=recipe.checkpoint,
        packed=d.packing,
        valid=valid,
        on_checkpoint=(refresher := Refresher(run.path)).checkpoint,
        world=world,
        objective=objective,
    )
    parameters = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if world.main:
        with atomic_directory(run.path / "adapters", force=True) as tmp:
            save_adapters(model, tmp, config)
    after = evaluate_recipe(recipe, model, tokenizer, base, "after training", echo, world)
    summary = RunSummary(
        output=run.path,
        adapters=run.path / "adapters",
        method=recipe.method.type
        + (f" {recipe.method.objective}" if recipe.method.objective != "sft" else ""),
        total_steps=total_steps,
        resumed_from=resumed_from,
        training=result,
        trainable_parameters=parameters,
        parameters=get_total_parameters(model),
        world_size=world.size,
        rank=world.rank,
    )
    if not world.main:
        return summary  # rank 0 writes and reports the run
    if after is not None:
        record = {"before": before.to_json(), "after": after.to_json()}
        write_text_atomic(run.path / "evaluation.json", strict_dumps(record, indent=2))
    summary.data = [report.summary()] + ([valid_report.summary()] if valid_examples else [])
    summary.before, summary.after = before, after
    summary.next = next_commands(recipe, base, run.path)
    write_text_atomic(run.path / "summary.json", strict_dumps(summary.to_json(), indent=2))
    try:
        summary.report = refresher.final()  # after summary.json: the page says "finished"
    except MlxLocalError:
        # A disk too full for the page: not finished, so running again (from the final
        # checkpoint) draws it rather than refusing a finished run.
        (run.path / "summary.json").unlink(missing_ok=True)
        raise
    return summary


def extended(recipe: Recipe, run: RunDir, steps: int) -> Recipe:
    """`recipe` trained `steps` past where the finished run in `run` stopped (`--extend`)."""
    ckpt = run.latest()
    if not (run.path / "summary.json").exists():
        where = f" (it stopped at {ckpt.name})" if ckpt else ""
        raise MlxLocalError(
            f"--extend: {run.path} holds no finished run{where}; run without --extend to "
            "finish or start it"
        )
    if ckpt is None:
        raise MlxLocalError(
            f"--extend: {run.path} finished without a final checkpoint (made by an older "
            "mlxlocal), so it cannot be continued exactly; start a new run with more steps"
        )
    total = read_position(ckpt).step + steps
    return recipe.model_copy(
        update={"training": recipe.training.model_copy(update={"steps": total, "epochs": None})}
    )


def rerun_command(
    recipe: Recipe,
    recipe_arg: str,
    overrides: list[str],
    resume: bool = False,
    extend: int | None = None,
) -> str:
    """The `mlxlocal run` line that continues a run stopped by Ctrl-C: the one given, except
    that an extension under way goes on by its new length (`--extend` would add again)."""
    run = RunDir(Path(recipe.output).expanduser())
    args = ["mlxlocal", "run", recipe_arg, *overrides]
    if extend is not None and (run.path / "summary.json").exists():
        args += ["--extend", str(extend)]  # stopped before the extension began
    elif extend is not None:
        steps = run.recipe_steps()
        args += ["training.epochs=null"] if recipe.training.epochs is not None else []
        args += [f"training.steps={steps}"] if steps is not None else []
    if resume and run.latest() is not None:
        args.append("--resume")
    return shlex.join(args)


def next_commands(recipe: Recipe, base: Path, run: Path) -> list[str]:
    """What to do with a finished run's adapters, as command lines that work as printed."""
    adapters, fused = run / "adapters", run / "fused"
    with_adapters = [str(base), "--adapter", str(adapters)]
    commands = [["mlxlocal", "chat", *with_adapters]]
    e = recipe.eval
    data = e.data or recipe.data.valid
    if e.task is not None and data is not None:
        evaluation = ["mlxlocal", "eval", *with_adapters, "--data", data, "--task", e.task]
        if e.labels and not any("," in label for label in e.labels):
            evaluation += ["--labels", ",".join(e.labels)]
        commands.append(evaluation + (["--limit", str(e.limit)] if e.limit else []))
    elif data is not None:
        perplexity = ["--data", data, "--task", "perplexity"]
        commands.append(["mlxlocal", "eval", *with_adapters, *perplexity])
    commands.append(["mlxlocal", "fuse", str(base), str(adapters), str(fused)])
    if (family_spec(read_config(base)["model_type"]) or {}).get("gguf_export"):
        commands.append(["mlxlocal", "export", "gguf", str(fused), str(run / "model.gguf")])
    commands.append(["mlxlocal", "report", str(run)])
    return [shlex.join(c) for c in commands]
