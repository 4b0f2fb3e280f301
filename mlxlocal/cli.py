"""The `mlxlocal` command: flags in, one library call per verb, results out."""

from __future__ import annotations

import math
import os
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .checkpoint.atomic import check_output
from .checkpoint.dtypes import DTYPES
from .checkpoint.jsonout import strict_dumps
from .choices import EVAL_TASKS, GGUF_TYPES, ON_ERROR
from .errors import MlxLocalError
from .quant_plan import MODES, PRESETS


class Cli(click.Group):
    """Prints a user's error as one line (exit 1); `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad flag or argument is a user's error like any other
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
            click.echo(f"error: {e.format_message()}{where}", err=True)
            ctx.exit(1)
        except (MlxLocalError, OSError) as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            msg = str(e) if isinstance(e, MlxLocalError) else f"{e} (run with --debug for details)"
            click.echo(f"error: {rank_prefix()}{msg}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left half-written", err=True)
            ctx.exit(130)


def rank_prefix() -> str:
    """ "rank R: " in a process `mlx.launch` started (it sets MLX_RANK), so a launcher relaying
    every rank's output shows whose error a line is."""
    rank = os.environ.get("MLX_RANK")
    return f"rank {rank}: " if rank else ""


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(__version__, prog_name="mlxlocal")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Convert, quantize, talk to and fine-tune language models on your own machine with MLX.

    \b
    Start with:
      mlxlocal quickstart                 # a tiny offline demo of the whole path
      mlxlocal convert Qwen/Qwen2.5-0.5B-Instruct ./qwen-mlx
      mlxlocal info ./qwen-mlx
    """
    ctx.obj = {"debug": debug}


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf, which every comparison lets through."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class Text(click.ParamType):
    """Text for the model: bytes that are not UTF-8 (on a POSIX command line they arrive as
    lone surrogates) are refused here, before any tokenizer chokes on them."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail("the text has bytes that are not UTF-8: write it in UTF-8", param, ctx)
        return value


TEXT = Text()
# MLX's seed is a uint64.
SEED = click.IntRange(0, 2**64 - 1)


def utf8(data: bytes, where: str, fix: str = "convert it to UTF-8 first") -> str:
    """`data` decoded; bytes that are not UTF-8 are one error line naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlxLocalError(
            f"{where} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): {fix}"
        ) from e


def _number(name: str, allowed: click.ParamType, default: float, help: str):
    """A numeric option whose type says what is allowed, with its default shown."""
    return click.option(name, type=allowed, default=default, show_default=True, help=help)


def _with_options(f, options: list):
    """`f` decorated with `options`, which appear in --help in list order."""
    for option in reversed(options):
        f = option(f)
    return f


def _quantize_options(f):
    """Flags shared by quantize and convert --quantize: what each layer becomes, what text
    measures it."""
    options = [
        click.option(
            "--bits", type=click.IntRange(2, 8), help="2, 3, 4, 5, 6 or 8 (default 4; mxfp8: 8)."
        ),
        click.option(
            "--group-size",
            type=click.IntRange(16, 128),
            help="32, 64 or 128; nvfp4: 16 (default: the mode's).",
        ),
        click.option(
            "--mode",
            type=click.Choice(list(MODES)),
            default="affine",
            show_default=True,
            help="affine (any bits) or a float format: mxfp4/nvfp4 (4 bits), mxfp8 (8 bits).",
        ),
        click.option(
            "--preset",
            type=click.Choice(list(PRESETS)),
            default="uniform",
            show_default=True,
            help="keep-embeddings: embeddings and output head at higher precision; mixed: also "
            "v_proj/down_proj of some layers (llama.cpp Q4_K_M style).",
        ),
        click.option(
            "--rule",
            "rules",
            multiple=True,
            metavar="PATTERN=BITS[/GROUP]",
            help="Per-layer override, regex on the module path, first match wins; BITS 16 keeps "
            "the layer unquantized (repeatable).",
        ),
        click.option(
            "--rules",
            "rules_file",
            type=click.Path(),
            help="YAML mapping of PATTERN: BITS[/GROUP], applied after the --rule flags.",
        ),
        click.option(
            "--target-bpw",
            type=Finite(0, min_open=True),
            help="Choose affine bits per layer to hit this average bits per weight with the "
            "least damage measured on the calibration text (one model run per layer and width).",
        ),
        click.option(
            "--calib",
            type=click.Path(),
            help="Your own text file instead of the built-in one: the first half calibrates "
            "--target-bpw, the second half evaluates.",
        ),
        click.option(
            "--no-eval",
            is_flag=True,
            help="Skip perplexity, KL and top-1 (no text is run; memory stays ~one layer).",
        ),
    ]
    return _with_options(f, options)


def _output_options(dtype_help: str):
    """Flags shared by convert and quantize: the output's dtype and shards, the source's
    revision, replacing OUT."""

    def decorate(f):
        options = [
            click.option("--dtype", type=click.Choice(list(DTYPES)), help=dtype_help),
            click.option(
                "--shard-size", default="5GB", show_default=True, help="Largest output shard."
            ),
            click.option("--revision", help="Hub branch, tag or commit (for a repo id SRC)."),
            click.option(
                "--force", is_flag=True, help="Replace OUT if it exists (only once all succeeded)."
            ),
        ]
        return _with_options(f, options)

    return decorate


def _run_quantize(src, out, dtype, shard_size, revision, force, qflags: dict) -> None:
    from .quantize import format_report
    from .quantize import quantize as run_quantize

    evaluate = not qflags.pop("no_eval")
    result = run_quantize(
        src,
        out,
        **qflags,
        evaluate=evaluate,
        dtype=dtype,
        shard_size=shard_size,
        revision=revision,
        force=force,
    )
    for note in result.notes:
        click.echo(f"fixed config: {note}", err=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"quantized {result.report['model_type']} → {result.out}")
    click.echo(format_report(result.report))


@cli.command()
@click.argument("src")
@click.argument("out", type=click.Path())
@_output_options("Weight dtype of the output (default: the source's).")
@click.option(
    "--verify",
    is_flag=True,
    help="Compare logits with transformers on probe prompts; exit 1 above tolerance.",
)
@click.option(
    "--quantize",
    "quantize_output",
    is_flag=True,
    help="Quantize while converting (same as `mlxlocal quantize`; see its --help).",
)
@_quantize_options
def convert(src, out, dtype, shard_size, revision, force, verify, quantize_output, **qflags):
    """Convert a Hugging Face checkpoint SRC into an MLX checkpoint at OUT.

    SRC is a local folder (safetensors, sharded or not, or pytorch_model*.bin read without
    running any code) or a Hub repo id (org/name), taken from the local Hugging Face cache
    first; it is downloaded only when not cached and HF_HUB_OFFLINE is not set.
    Config drift that mlx-lm would silently misread is fixed and reported. A llama.cpp .gguf
    file SRC is imported instead.
    With --quantize the output is quantized in the same pass and a quality report is printed.
    """
    from .checkpoint.files import is_gguf_file
    from .convert import convert as run_convert
    from .gguf_import import convert_gguf

    if quantize_output:
        if verify:
            raise MlxLocalError(
                "--verify checks a full-precision conversion; a quantized one is measured by "
                "its quality report instead: drop --verify"
            )
        _run_quantize(src, out, dtype, shard_size, revision, force, qflags)
        return
    if any(value not in (None, (), False, "affine", "uniform") for value in qflags.values()):
        raise MlxLocalError("quantization options apply only with --quantize: add --quantize")

    if is_gguf_file(src):
        result = convert_gguf(src, out, dtype=dtype, shard_size=shard_size, force=force)
    else:
        result = run_convert(
            src, out, dtype=dtype, shard_size=shard_size, revision=revision, force=force
        )
    for note in result.notes:
        click.echo(f"fixed config: {note}", err=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"converted {result.model_type} ({result.parameters:,} parameters, {result.dtype}) "
        f"→ {result.out} [{len(result.shards)} shard(s), {result.bytes / 1e6:.1f} MB]"
    )
    if verify:
        from .verify import format_report, verify_conversion

        report = verify_conversion(src, result.out, revision=revision)
        click.echo(format_report(report))
        if not report["passed"]:
            raise MlxLocalError(
                "verification failed: the converted model's logits differ from the source's "
                "beyond tolerance; please report this with the `mlxlocal info` output"
            )


@cli.command()
@click.argument("src")
@click.argument("out", type=click.Path())
@_output_options("Dtype of what stays unquantized and of affine scales (default: the source's).")
@_quantize_options
def quantize(src, out, dtype, shard_size, revision, force, **qflags) -> None:
    """Quantize SRC (a Hugging Face or unquantized MLX checkpoint) into an MLX checkpoint at OUT,
    and report what it cost.

    \b
    Examples:
      mlxlocal quantize ./qwen-mlx ./qwen-4bit                    # 4-bit affine, group 64
      mlxlocal quantize ./qwen-mlx ./qwen-mixed --preset mixed    # sensitive layers at 6 bits
      mlxlocal quantize ./qwen-mlx ./qwen-q --rule 'lm_head=8' --rule 'layers.0.mlp=6/32'
      mlxlocal quantize ./qwen-mlx ./qwen-4.5 --target-bpw 4.5    # bits chosen per layer

    A layer whose width the group size does not divide gets the largest group size that does
    (or stays at full precision), and the report says so. The report (bits per weight counted
    from the written file, sizes, per-layer bits and weight error, perplexity before/after and
    KL / top-1 agreement against the unquantized model) is printed and written to
    OUT/quantization_report.json. The output opens with mlx_lm.load.
    """
    _run_quantize(src, out, dtype, shard_size, revision, force, qflags)


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def info(path, as_json) -> None:
    """Describe PATH: a checkpoint (HF or MLX folder, or a cached Hub repo id), an adapter
    folder, or a training run directory."""
    from .info import format_info
    from .info import info as run_info

    data = run_info(path)
    click.echo(strict_dumps(data, indent=2) if as_json else format_info(data))


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--open", "show", is_flag=True, help="Open the page in your web browser.")
def report(run, show) -> None:
    """Draw the training run in RUN (a recipe's output) as a page: RUN/report/index.html.

    Loss (training and validation) against steps and tokens, learning rate, gradient norm,
    tokens/s, peak memory, task scores before and after, and the recipe; `run` keeps it
    up to date by itself.
    """
    from .report import open_in_browser, write_report

    page = write_report(run)
    click.echo(f"report: {page}")
    if show and not open_in_browser(page):
        click.echo(f"no web browser found: open {page} yourself", err=True)


_encoding_option = click.option(
    "--encoding",
    type=TEXT,
    help="The data file's text encoding, e.g. cp1252 or latin-1 (default: UTF-8, or what its "
    "byte-order mark says).",
)


def _generation_options(f):
    """Flags shared by generate, chat and batch: the model's adapter, sampling, when to stop."""
    options = [
        click.option("--adapter", type=click.Path(), help="LoRA adapter folder to apply."),
        click.option(
            "--system", type=TEXT, help="System prompt (needs the model's chat template)."
        ),
        _number("--max-tokens", click.IntRange(1), 256, "Longest answer."),
        _number("--temp", Finite(0), 0.0, "Temperature; 0 is greedy."),
        _number("--top-p", Finite(0, 1, min_open=True), 1.0, "Nucleus sampling mass; 1: off."),
        _number(
            "--top-k",
            click.IntRange(0),
            0,
            "Keep the k likeliest; 0 (or the vocabulary size and above): off.",
        ),
        _number("--min-p", Finite(0, 1, max_open=True), 0.0, "Min prob. vs top; 0: off."),
        click.option(
            "--repetition-penalty",
            type=Finite(0, min_open=True),
            help="Above 1 discourages repeats; 1: off.",
        ),
        click.option("--seed", type=SEED, help="Random seed: same seed, same text."),
        click.option(
            "--stop",
            type=TEXT,
            multiple=True,
            help="Stop at this text, not printed (repeatable).",
        ),
        *_CONSTRAINT_OPTIONS,
    ]
    return _with_options(f, options)


# Constrained decoding (one at a time): the answer must have this shape.
_CONSTRAINT_OPTIONS = [
    click.option(
        "--choices",
        type=TEXT,
        help="Answer exactly one of these labels, comma-separated (batch: '{FIELD}' reads "
        "each record's labels from FIELD).",
    ),
    click.option("--regex", type=TEXT, help="The whole answer matches this regular expression."),
    click.option(
        "--json-schema", type=click.Path(), help="Answer JSON valid under this schema file."
    ),
    click.option("--json-object", is_flag=True, help="Answer any JSON object."),
]


def _with_constraint_options(f):
    return _with_options(f, _CONSTRAINT_OPTIONS)


def _generation_kwargs(flags: dict) -> dict:
    """The shared flags as the library's keyword arguments."""
    from .generate import Sampling

    names = ("temp", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    sampling = Sampling(**{name: flags.pop(name) for name in names})
    return {**flags, "stop": tuple(flags["stop"]), "sampling": sampling}


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-p", "--prompt", type=TEXT, help="The prompt; `-p -` reads it from stdin.")
@_generation_options
@click.option("--no-chat-template", is_flag=True, help="Send the prompt as plain text.")
@click.option("--truncate", is_flag=True, help="Drop a too-long prompt's oldest tokens.")
@click.option("--ignore-eos", is_flag=True, help="Keep going past EOS and end-of-turn tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def generate(model, prompt, no_chat_template, truncate, ignore_eos, as_json, **flags) -> None:
    """Generate an answer to one prompt with MODEL (an MLX folder), streamed as it comes.

    The model's chat template is applied when it has one. A one-line summary goes to stderr:
    prompt tokens and tok/s, generated tokens and tok/s, peak memory.

    \b
      mlxlocal generate ./qwen-mlx -p "Name three rivers."
      echo "Summarise: ..." | mlxlocal generate ./qwen-mlx -p - --max-tokens 100 --json
    """
    from .generate import stream

    if prompt is None:
        raise MlxLocalError("give a prompt: -p TEXT, or -p - to read it from stdin")
    if prompt == "-":
        prompt = utf8(sys.stdin.buffer.read(), "stdin").rstrip("\n")
    answer = stream(
        model,
        prompt,
        chat_template=not no_chat_template,
        truncate=truncate,
        ignore_eos=ignore_eos,
        **_generation_kwargs(flags),
    )
    for warning in answer.warnings:
        click.echo(f"warning: {warning}", err=True)
    for piece in answer:
        if not as_json:
            click.echo(piece, nl=False)
    click.echo(strict_dumps(answer.result.to_json(), ensure_ascii=False) if as_json else "")
    click.echo(answer.result.summary(), err=True)


@cli.command()
@click.argument("model", type=click.Path())
@_generation_options
def chat(model, **flags) -> None:
    """Talk with MODEL; the conversation's KV cache is kept, so history is not re-read.

    \b
    Commands: /reset, /system TEXT, /save FILE (JSON; --force replaces an existing FILE),
    /quit (or Ctrl-D).
    Ctrl-C stops the current answer and keeps the chat going.
    With stdin not a terminal, each line is one message (scriptable):
      printf 'Hi\nWhat did I say?\n' | mlxlocal chat ./qwen-mlx
    """
    from .chat import HELP, ChatSession, repl
    from .generate import load_model

    options = _generation_kwargs(flags)
    session = ChatSession(load_model(model, options.pop("adapter")), **options)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(HELP, err=True)
    stdin = sys.stdin.buffer

    def read() -> str:
        if interactive:
            click.echo("> ", nl=False)
        line = stdin.readline()
        if not line:
            raise EOFError
        return utf8(line, "the line", "it was not sent; type it again")

    repl(
        session,
        read=read,
        write=lambda text: click.echo(text, nl=False),
        note=lambda text: click.echo(text, err=True),
    )


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(), help="JSONL or .csv.")
@click.option(
    "--output",
    required=True,
    type=click.Path(),
    help="Its extension picks the format: .jsonl (JSON lines) or .csv/.tsv (a table).",
)
@click.option(
    "--template", type=TEXT, help="Prompt from the record's fields, e.g. 'Classify: {text}'."
)
@click.option(
    "--field",
    "field_specs",
    type=TEXT,
    multiple=True,
    help="COLUMN holding the prompt (default: prompt, else text), or prompt=COLUMN / "
    "system=COLUMN. Repeatable.",
)
@_encoding_option
@_generation_options
@_number("--batch-size", click.IntRange(1, 65536), 32, "Sequences generated at once.")
@click.option(
    "--on-error",
    type=click.Choice(ON_ERROR),
    default="stop",
    show_default=True,
    help="A bad record stops the run, or gets an error line in the output.",
)
@click.option("--no-chat-template", is_flag=True, help="Send prompts as plain text.")
@click.option("--truncate", is_flag=True, help="Drop a too-long prompt's oldest tokens.")
@click.option("--ignore-eos", is_flag=True, help="Keep going past EOS and end-of-turn tokens.")
@click.option(
    "--no-prefix-cache",
    is_flag=True,
    help="Process each prompt whole, not its shared prefix once (same outputs, slower).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT, discarding an interrupted run.")
def batch(
    model, input_path, output, no_chat_template, field_specs, no_prefix_cache, **flags
) -> None:
    """Run every record of a JSONL/CSV file through MODEL, batched; resumable.

    Each output line is the input record's fields plus id (its own "id" field, or its line
    number), output, finish_reason and generated_tokens, in input order. Work goes to
    OUTPUT.partial, renamed to OUTPUT at the end; after Ctrl-C or a kill, re-run the same
    command to continue: nothing is lost or repeated.

    \b
      mlxlocal batch ./qwen-mlx --input tickets.jsonl --output labels.jsonl
          --template 'Classify as bug/question/praise: {text}' --max-tokens 8
      mlxlocal batch ./qwen-mlx --input reviews.csv --output out.csv --field review
    """
    from .batch import BATCH_FIELDS
    from .batch import batch as run_batch
    from .data import field_mapping

    bare = [spec for spec in field_specs if "=" not in spec]
    if len(bare) > 1:
        raise MlxLocalError(f"--field: one prompt column, not {len(bare)} ({', '.join(bare)})")
    fields = field_mapping([s for s in field_specs if "=" in s], BATCH_FIELDS)
    try:
        result = run_batch(
            model,
            input_path,
            output,
            field=bare[0] if bare else None,
            fields=fields,
            chat_template=not no_chat_template,
            prefix_cache=not no_prefix_cache,
            note=lambda text: click.echo(text, err=True),
            **_generation_kwargs(flags),
        )
    except KeyboardInterrupt:
        click.echo("stopped: re-run the same command to continue", err=True)
        raise
    for warning in result.warnings[:10]:
        click.echo(f"warning: {warning}", err=True)
    if len(result.warnings) > 10:
        click.echo(f"warning: … and {len(result.warnings) - 10} more", err=True)
    click.echo(result.summary())


def _adapter_pair(ctx, param, values) -> dict[str, str]:
    """--adapter NAME=DIR, repeatable, as {NAME: DIR}."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise click.BadParameter(f"{value!r}: write NAME=DIR (e.g. support=./run/adapters)")
        if name in pairs:
            raise click.BadParameter(f"the name {name!r} is given twice")
        pairs[name] = folder
    return pairs


@cli.command()
@click.argument("model", type=click.Path())
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    callback=_adapter_pair,
    help="NAME=DIR: serve this adapters folder as model NAME (repeatable).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@_number("--port", click.IntRange(0, 65535), 8080, "Port (0: any free one).")
@click.option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1/ requests.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a key.")
@_number("--max-concurrency", click.IntRange(1, 1024), 16, "Sequences generated at once.")
@_number("--queue", click.IntRange(0, 100000), 64, "Requests waiting beyond those (then 429).")
@click.option(
    "--prefix-cache",
    default="512MB",
    show_default=True,
    help="KV caches kept for prompts that share a prefix (chat turns), at most twice "
    "--max-concurrency of them; 0: off.",
)
@click.option("--log-prompts", is_flag=True, help="Put prompt text in the access log.")
def serve(
    model, adapters, host, port, api_key, insecure, max_concurrency, queue, prefix_cache,
    log_prompts,
):  # fmt: skip
    """Serve MODEL (and adapters over it) as an OpenAI-compatible API at http://HOST:PORT/v1.

    \b
      mlxlocal serve ./qwen-mlx --adapter support=./run/adapters
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "support", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from .checkpoint.shards import parse_size
    from .serve import serve as run_server

    cache_bytes = None if prefix_cache.strip() in ("0", "off") else parse_size(prefix_cache)
    run_server(
        model,
        adapters,
        host=host,
        port=port,
        api_key=api_key,
        insecure=insecure,
        max_concurrency=max_concurrency,
        queue=queue,
        log_prompts=log_prompts,
        prefix_cache=cache_bytes,
        note=lambda text: click.echo(text, err=True),
    )


@cli.command()
@click.option("--workdir", type=click.Path(), default=None, help="Where to put the demo files.")
def quickstart(workdir) -> None:
    """The whole path offline in a few minutes: convert, quantize, fine-tune, evaluate, chat.

    A tiny random-weight stand-in model (built by mlxlocal; use a real one from the Hub for
    real work) is converted to MLX, quantized, taught sentiment analysis with LoRA on the
    review set shipped with mlxlocal, and scored on held-out reviews before and after. It ends
    with a summary: accuracy before → after, size before → after, where the adapters and the
    run directory are, and the command to chat with the result.
    """
    from .quickstart import run_quickstart

    run_quickstart(workdir, echo=click.echo)


@cli.group()
def recipes() -> None:
    """Built-in fine-tuning recipes: list them, read one, copy one to edit, check a recipe.

    \b
    A recipe is one YAML file: model, data, method (lora/dora/full), training, eval,
    checkpoint, output. Start from a built-in one:
      mlxlocal recipes list
      mlxlocal recipes copy qwen2.5-0.5b-lora my-recipe.yaml
      mlxlocal recipes validate my-recipe.yaml data.train=mine.jsonl
    """


@recipes.command("list")
def recipes_list() -> None:
    """Table of the built-in recipes: what each is for and its estimated peak memory on this
    machine (`mlxlocal plan NAME` breaks it down)."""
    from .plan import recipe_memory
    from .recipe import builtin_recipes, format_recipe_table

    recipes = builtin_recipes()
    click.echo(format_recipe_table(recipes, {r.name: recipe_memory(r.path) for r in recipes}))


@recipes.command("show")
@click.argument("name")
def recipes_show(name) -> None:
    """Print the built-in recipe NAME (see `mlxlocal recipes list`)."""
    from .recipe import show_recipe

    click.echo(show_recipe(name), nl=False)


@recipes.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
def recipes_copy(name, dest, force) -> None:
    """Copy the built-in recipe NAME to DEST (a file, or a folder) to edit it.

    Relative data paths in a recipe are read from the recipe's own folder.
    """
    from .recipe import copy_recipe

    click.echo(f"copied {name} → {copy_recipe(name, dest, force=force)}")


@recipes.command("validate")
@click.argument("file")
@click.argument("overrides", nargs=-1)
def recipes_validate(file, overrides) -> None:
    """Check the recipe FILE without running it: every key, the model and the data.

    OVERRIDES are key.path=value settings (values read as YAML) that win over the file, as
    with `mlxlocal run`, e.g. training.learning_rate=2e-4 data.train=other.jsonl. A Hub
    model is looked for in the local cache only; nothing is downloaded.
    """
    from .train.preflight import validate_recipe

    note = lambda text: click.echo(f"note: {text}", err=True)  # noqa: E731
    for line in validate_recipe(file, list(overrides), note):
        click.echo(line)
    from .plan import memory_warning

    warning = memory_warning(file, list(overrides))
    if warning:
        click.echo(f"warning: {warning}", err=True)
    click.echo("ok")


@cli.command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Insist on continuing from the last checkpoint.")
@click.option(
    "--extend",
    type=click.IntRange(1),
    metavar="N",
    help="Continue the finished run in `output` for N more steps.",
)
@click.option(
    "--nproc",
    type=click.IntRange(1),
    metavar="N",
    help="Train data-parallel on N processes of this machine (through mlx.launch).",
)
@click.option(
    "--hosts",
    "hostfile",
    type=click.Path(),
    metavar="FILE",
    help="Train data-parallel on the machines of an mlx.launch hostfile (JSON; see README).",
)
@click.option(
    "--backend",
    type=click.Choice(["ring", "mpi", "jaccl", "nccl"]),
    default="ring",
    show_default=True,
    help="mlx.distributed back end for --nproc/--hosts.",
)
def run(recipe, overrides, resume, extend, nproc, hostfile, backend) -> None:
    """Fine-tune as the RECIPE file (or built-in recipe name) says.

    OVERRIDES are key.path=value settings that win over the file, e.g.
    training.learning_rate=2e-4 output=runs/try2. The run directory (`output`) gets the
    resolved recipe, metrics.jsonl, checkpoints step-N/ (with checkpoint.every, and always the
    last step) and the final adapters/. A run killed mid-way continues exactly where its last
    checkpoint left off when started again (same optimizer state, schedule and data order);
    --resume insists on that. Ctrl-C stops after the step under way, saves it and prints the
    command that continues. --extend N (or a higher training.steps) continues a finished run.
    Outside a terminal a progress line is printed every 30 s ($MLXLOCAL_PROGRESS_SECONDS).
    --nproc N or --hosts FILE trains data-parallel on N processes or the hostfile's machines
    (mlx.launch; the same command works started by `mlx.launch` itself).

    \b
      mlxlocal run tiny-lora
      mlxlocal run my-recipe.yaml training.steps=200
      mlxlocal run my-recipe.yaml --extend 100
      mlxlocal run my-recipe.yaml --nproc 2
    """
    from .recipe import load_recipe
    from .train.run import rerun_command, run_recipe

    loaded = load_recipe(recipe, list(overrides))
    if nproc is not None or hostfile is not None:
        from .train.launch import launch

        args = ["run", recipe, *overrides, *(["--resume"] if resume else [])]
        args += ["--extend", str(extend)] if extend is not None else []
        launch(args, nproc, Path(hostfile) if hostfile else None, backend)
        return
    try:
        summary = run_recipe(
            loaded,
            resume=True if resume else None,
            echo=lambda text: click.echo(text, err=True),
            extend=extend,
        )
    except KeyboardInterrupt as e:
        step = getattr(e, "step", None)
        where = f" after step {step} (saved in {e.checkpoint})" if step else ""
        command = rerun_command(loaded, recipe, list(overrides), resume, extend)
        click.echo(f"stopped{where}; to continue:\n  {command}", err=True)
        raise
    for line in summary.lines() if summary.rank == 0 else []:
        click.echo(line)


@cli.command()
@click.argument("target")
@click.argument("overrides", nargs=-1)
@click.option(
    "--memory",
    help="Memory to fit in, e.g. 16GB (default: this machine's).",
)
@click.option("--context", type=click.IntRange(1), help="Inference: tokens per sequence.")
@click.option("--batch", type=click.IntRange(1), help="Inference: sequences at once.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Compute dtype (default: the recipe's, `auto` being this machine's).",
)
@click.option(
    "--throughput",
    type=click.FloatRange(min=0, min_open=True),
    help="Training tokens/s measured on this machine, for the time per step "
    "(default: from the recipe's earlier run in its output directory, if any).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(target, overrides, memory, context, batch, dtype, throughput, as_json) -> None:
    """Estimate peak memory for a recipe (training) or a model (inference), from its config.

    TARGET is a recipe file or built-in recipe name (OVERRIDES as with `run`), or a model
    (folder, config.json, builtin:tiny or a Hub id in the cache) with --context/--batch.
    Nothing is downloaded and no weights are read. When the estimate exceeds --memory
    (default: this machine's), the changes that make it fit are listed with their estimates.

    \b
      mlxlocal plan qwen2.5-1.5b-lora --memory 8GB
      mlxlocal plan Qwen/Qwen2.5-7B-Instruct --context 8192 --batch 4
    """
    import json as json_module
    from pathlib import Path

    from .plan import machine_memory, parse_memory, plan_model, plan_recipe
    from .recipe import builtin_recipe_path

    budget = parse_memory(memory) if memory is not None else machine_memory()
    path = Path(target).expanduser()
    is_recipe = path.suffix in (".yaml", ".yml") and path.is_file()
    if not is_recipe and not path.exists() and "/" not in target:
        try:
            builtin_recipe_path(target)
            is_recipe = True
        except MlxLocalError:
            pass
    if is_recipe:
        if context or batch:
            raise MlxLocalError("--context and --batch plan inference: give a model, not a recipe")
        result = plan_recipe(target, list(overrides), budget, dtype, throughput)
    else:
        if overrides or throughput:
            raise MlxLocalError(
                f"{target} is a model: overrides and --throughput apply to recipes only"
            )
        result = plan_model(target, context or 4096, batch or 1, budget, dtype)
    if as_json:
        click.echo(json_module.dumps(result.to_json()))
    else:
        click.echo("\n".join(result.lines()))


@cli.command("eval")
@click.argument("model", type=click.Path())
@click.option("--adapter", type=click.Path(), help="Adapters folder (from `mlxlocal run`).")
@click.option("--data", required=True, help="Data file (.jsonl/.csv) or builtin:NAME.")
@click.option("--task", required=True, type=click.Choice(EVAL_TASKS))
@click.option(
    "--labels", type=TEXT, help="classify: the labels, comma-separated (default: those in DATA)."
)
@click.option("--limit", type=click.IntRange(1), help="Evaluate only the first N rows.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option(
    "--field",
    "field_specs",
    type=TEXT,
    multiple=True,
    help="NAME=COLUMN: read field NAME (prompt, completion, messages, ...) from COLUMN, as a "
    "recipe's data.fields. Repeatable.",
)
@_encoding_option
@click.option("--output", type=click.Path(), help="Write metrics and per-example predictions.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_with_constraint_options
def eval_(
    model,
    adapter,
    data,
    task,
    labels,
    limit,
    batch_size,
    max_tokens,
    field_specs,
    encoding,
    output,
    force,
    **constraint,
) -> None:
    """Score MODEL (optionally with --adapter) on a task, to see what fine-tuning changed.

    Rows are read like training data (prompt/completion, chat or instruction); the last
    assistant answer of each row is its label or reference.

    \b
    perplexity  exp(mean NLL) of the tokens training learns (answers, or all of text data)
    classify    each label scored by the model's log-likelihood as the answer to the prompt;
                accuracy, macro-F1, per-class precision/recall, confusion matrix
    generate    greedy answers (up to --max-tokens) vs references: exact match, chrF, BLEU;
                --choices/--regex/--json-schema/--json-object constrain them (+ valid rate)
    \b
      mlxlocal eval ./tiny-mlx --adapter runs/sentiment/adapters \\
          --data builtin:sentiment-test.jsonl --task classify --output results.json
    """
    from .data import field_mapping
    from .evaluate import evaluate, write_results

    fields = field_mapping(field_specs)
    if output:
        check_output(output, force)  # before the model runs, not after
    result = evaluate(
        model,
        data,
        task,
        adapter=adapter,
        labels=labels.split(",") if labels else None,
        limit=limit,
        batch_size=batch_size,
        max_tokens=max_tokens,
        fields=fields,
        encoding=encoding,
        note=lambda text: click.echo(f"note: {text}", err=True),
        **constraint,
    )
    click.echo(result.table())
    if output:
        click.echo(f"per-example results: {write_results(result, output, force)}")


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("adapters", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--dequantize", is_flag=True, help="Write float weights, even for a quantized MODEL.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once all succeeded).")
def fuse(model, adapters, out, dequantize, force) -> None:
    """Merge the ADAPTERS folder (from `mlxlocal run`) into MODEL's weights, written to OUT.

    A quantized MODEL is quantized again with its own settings unless --dequantize. OUT is an
    MLX checkpoint that needs no adapter to load.

    \b
      mlxlocal fuse runs/my-run/model runs/my-run/adapters my-model
    """
    from .train.fuse import fuse as run_fuse

    result = run_fuse(model, adapters, out, dequantize=dequantize, force=force)
    kind = "quantized" if result.quantized else "float"
    click.echo(
        f"fused {result.fused_layers} adapted layers → {result.out} ({kind}, "
        f"{len(result.shards)} shard(s), {result.bytes / 1e6:.1f} MB)"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def blas(as_json) -> None:
    """Show which BLAS MLX's CPU back end uses, and check its fp32 matmul against numpy.

    \b
    MLX's Linux CPU wheel ships a slow reference BLAS. Opt in to Intel's MKL with
      pip install 'mlxlocal[fast-cpu]'
      MLXLOCAL_BLAS=mkl mlxlocal <verb> ...
    """
    from .blas import check_matmul

    result = check_matmul()
    if as_json:
        click.echo(strict_dumps(result))
    else:
        click.echo(
            f"BLAS: {result['blas']}  fp32 matmul 1024³: {result['gflops']:.1f} GFLOP/s, "
            f"max relative error vs numpy float64 {result['relative_error']:.1e}"
        )


_GGUF_TYPES = click.Choice(["auto", *GGUF_TYPES])


@cli.group()
def export() -> None:
    """Take a model or adapter to other runtimes: llama.cpp/Ollama (GGUF) and PEFT.

    \b
      mlxlocal export gguf my-model my-model.gguf --type q8_0
      mlxlocal export gguf base-model adapter.gguf --adapter runs/x/adapters --adapter-only
      mlxlocal export ollama my-model ollama-dir   # then: ollama create me -f ollama-dir/Modelfile
      mlxlocal export peft runs/x/adapters peft-adapter
    """


def _print_gguf(result) -> None:
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"wrote {result.out} ({result.arch}, {result.type}, {result.tensors} tensors, "
        f"{result.bytes / 1e6:.1f} MB)"
    )


@export.command("gguf")
@click.argument("model", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--adapter", type=click.Path(), help="Fuse this adapter (ours or PEFT) in first.")
@click.option(
    "--adapter-only",
    is_flag=True,
    help="Write only --adapter, as a GGUF LoRA adapter for MODEL's GGUF (llama.cpp --lora).",
)
@click.option(
    "--type",
    "type_",
    type=_GGUF_TYPES,
    default="auto",
    show_default=True,
    help="GGML type of the 2-D weights; auto keeps the dtype, 4-bit g32 → q4_1.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once all succeeded).")
def export_gguf(model, out, adapter, adapter_only, type_, force) -> None:
    """Write the MLX checkpoint MODEL as one GGUF file OUT for llama.cpp, Ollama, LM Studio.

    Llama, Mistral and Qwen2 families. Norms stay F32; a 4-bit group-32 MODEL repacks to q4_1
    without changing a weight; other quantized models are re-quantized (with a warning).
    """
    from .export.gguf import export_gguf as run
    from .export.gguf import export_gguf_adapter

    if adapter_only:
        if not adapter:
            raise MlxLocalError("--adapter-only needs --adapter DIR")
        _print_gguf(export_gguf_adapter(adapter, model, out, force=force))
    else:
        _print_gguf(run(model, out, adapter=adapter, type=type_, force=force))


@export.command("ollama")
@click.argument("model", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--adapter", type=click.Path(), help="Fuse this adapter (ours or PEFT) in first.")
@click.option(
    "--type", "type_", type=_GGUF_TYPES, default="auto", show_default=True, help="GGML type."
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once all succeeded).")
def export_ollama(model, out, adapter, type_, force) -> None:
    """Write folder OUT with model.gguf and a Modelfile (chat template, stop tokens).

    Then: ollama create NAME -f OUT/Modelfile
    """
    from .export.ollama import export_ollama as run

    _print_gguf(run(model, out, adapter=adapter, type=type_, force=force))
    click.echo(f"next: ollama create NAME -f {out}/Modelfile")


@export.command("peft")
@click.argument("adapters", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--base-model", help="Hub id or path to record as base_model_name_or_path.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once all succeeded).")
def export_peft(adapters, out, base_model, force) -> None:
    """Write the ADAPTERS folder (LoRA, rsLoRA or DoRA) as a PEFT adapter folder OUT.

    Load it with peft.PeftModel.from_pretrained(base_model, OUT).
    """
    from .export.peft import export_peft as run

    click.echo(f"wrote {run(adapters, out, base_model=base_model, force=force)}")


@cli.group("import")
def import_() -> None:
    """Bring adapters made elsewhere (PEFT) to mlxlocal. GGUF models: `mlxlocal convert X.gguf`."""


@import_.command("peft")
@click.argument("peft_dir", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--model", required=True, type=click.Path(), help="The MLX checkpoint it adapts.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once all succeeded).")
def import_peft(peft_dir, out, model, force) -> None:
    """Write the PEFT adapter PEFT_DIR in mlx-lm's layout at OUT, checked against --model.

    OUT works with `mlx_lm.generate --adapter-path OUT` and mlxlocal's --adapter options.
    """
    from .export.peft import import_peft as run

    click.echo(f"wrote {run(peft_dir, out, model, force=force)}")


def main() -> None:
    from .blas import reexec_with_fast_blas

    try:
        reexec_with_fast_blas()
    except MlxLocalError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    cli(prog_name="mlxlocal")


if __name__ == "__main__":
    sys.exit(main())
