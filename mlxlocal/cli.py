"""The `mlxlocal` command: flags in, one library call per verb, results out."""

from __future__ import annotations

import json
import sys
import traceback

import click

from . import __version__
from .errors import MlxLocalError


class Cli(click.Group):
    """Prints a user's error as one line (exit 1); `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (MlxLocalError, OSError) as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            msg = str(e) if isinstance(e, MlxLocalError) else f"{e} (run with --debug for details)"
            click.echo(f"error: {msg}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left half-written", err=True)
            ctx.exit(130)


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


@cli.command()
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Weight dtype of the output (default: the source's).",
)
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--revision", help="Hub branch, tag or commit (for a repo id SRC).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once all succeeded).")
@click.option(
    "--verify",
    is_flag=True,
    help="Compare logits with transformers on probe prompts; exit 1 above tolerance.",
)
def convert(src, out, dtype, shard_size, revision, force, verify) -> None:
    """Convert a Hugging Face checkpoint SRC into an MLX checkpoint at OUT.

    SRC is a local folder (safetensors, sharded or not, or pytorch_model*.bin read without
    running any code) or a Hub repo id (org/name), taken from the local Hugging Face cache
    first; it is downloaded only when not cached and HF_HUB_OFFLINE is not set.
    Config drift that mlx-lm would silently misread is fixed and reported.
    """
    from .convert import convert as run_convert

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
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def info(path, as_json) -> None:
    """Describe the checkpoint at PATH (HF or MLX folder, or a cached Hub repo id)."""
    from .info import format_info
    from .info import info as run_info

    data = run_info(path)
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@cli.command()
@click.option("--workdir", type=click.Path(), default=None, help="Where to put the demo files.")
def quickstart(workdir) -> None:
    """Build a tiny offline stand-in model, convert it, describe it and generate from it."""
    from .quickstart import run_quickstart

    run_quickstart(workdir, echo=click.echo)


def main() -> None:
    cli(prog_name="mlxlocal")


if __name__ == "__main__":
    sys.exit(main())
