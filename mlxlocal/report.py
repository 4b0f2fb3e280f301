"""`mlxlocal report RUN`: a training run as pictures, in one self-contained HTML page.

Read only from the run directory's files (metrics.jsonl, summary.json, evaluation.json,
recipe.yaml: train/checkpoints.py lists them), so it works on a run under way, stopped or
finished, on any machine. The page and its PNGs (drawn by matplotlib's Agg back end) go into
RUN/report/, replaced whole: the page never refers to anything outside that folder.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint.atomic import atomic_directory
from .checkpoint.inputs import load_yaml, read_json, read_text
from .errors import MlxLocalError
from .train.checkpoints import RunDir, read_position

REPORT = "report"  # RUN/report/index.html and its figures


@dataclass
class RunFiles:
    """What a run directory holds, read without loading a tensor."""

    path: Path
    metrics: list[dict[str, Any]]
    recipe_text: str
    recipe: dict[str, Any]
    summary: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    pid: int | None = None  # of the `mlxlocal run` training it, while one does
    last_checkpoint: int | None = None  # its step

    @property
    def status(self) -> str:
        """finished (summary.json written), running (its process lives) or failed."""
        if self.summary is not None:
            return "finished"
        return "running" if self.pid is not None and _alive(self.pid) else "failed"

    @property
    def grad_clip(self) -> float | None:
        training = self.recipe.get("training")
        return training.get("grad_clip") if isinstance(training, dict) else None

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(xs, ys) of the steps that recorded `key` with a number (NaN is written as null)."""
        points = [
            (m[x], m[key])
            for m in self.metrics
            if isinstance(m.get(key), int | float) and isinstance(m.get(x), int | float)
        ]
        return [p[0] for p in points], [p[1] for p in points]


def read_run(path: str | Path) -> RunFiles:
    """The run directory at `path`, or one clear error saying why it is not a run to report."""
    run = RunDir(Path(path).expanduser())
    p = run.path
    if not p.is_dir():
        raise MlxLocalError(f"{p}: no such run directory (give the `output` of a recipe)")
    if not (p / "recipe.yaml").is_file():
        raise MlxLocalError(f"{p} is not a training run (it has no recipe.yaml)")
    recipe_text = read_text(p / "recipe.yaml", "recipe")
    recipe = load_yaml(recipe_text, str(p / "recipe.yaml"), "recipes")[0]
    metrics = run.records() if run.metrics.exists() else []
    if not metrics:
        raise MlxLocalError(
            f"{p} has no training metrics yet (metrics.jsonl is missing or empty): "
            "wait for its first step, or run the recipe"
        )
    files = RunFiles(p, metrics, recipe_text, recipe if isinstance(recipe, dict) else {})
    if (p / "summary.json").exists():
        files.summary = read_json(p / "summary.json", "run summary")
    if (p / "evaluation.json").exists():
        files.evaluation = read_json(p / "evaluation.json", "run evaluation")
    files.pid = run.running_pid()
    ckpt = run.latest()
    files.last_checkpoint = read_position(ckpt).step if ckpt else None
    return files


def report_path(run: str | Path) -> Path:
    return Path(run).expanduser() / REPORT / "index.html"


def write_report(run: str | Path) -> Path:
    """Draw the run's figures and write RUN/report/ whole; return the page's path."""
    files = read_run(run)
    with atomic_directory(files.path / REPORT, force=True) as tmp:
        figures = draw_figures(files, tmp)
        (tmp / "index.html").write_text(page(files, figures), encoding="utf-8")
    return report_path(files.path)


@dataclass
class Figure:
    file: str
    title: str
    note: str = ""


@dataclass
class _Plots:
    """matplotlib, loaded only when a report is drawn (it takes a good part of a second)."""

    out: Path
    figures: list[Figure] = field(default_factory=list)

    def __post_init__(self):
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt

        self.plt = plt

    def save(self, fig, file: str, title: str, note: str = "") -> None:
        fig.tight_layout()
        fig.savefig(self.out / file, dpi=100)
        self.plt.close(fig)
        self.figures.append(Figure(file, title, note))

    def lines(self, file, title, curves, xlabel, ylabel, note="", marks=None, logy=False):
        """One axes of (label, xs, ys) curves; `marks` (label, xs, ys) as red crosses."""
        fig, ax = self.plt.subplots(figsize=(7, 3.6))
        for label, xs, ys in curves:
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        if marks and marks[1]:
            ax.scatter(marks[1], marks[2], marker="x", color="red", zorder=3, label=marks[0])
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len([c for c in curves if c[1]]) > 1 or (marks and marks[1]):
            ax.legend()
        self.save(fig, file, title, note)


def draw_figures(files: RunFiles, out: Path) -> list[Figure]:
    """The run's PNGs into `out`; what each shows, in page order."""
    plots = _Plots(out)
    for x, xlabel, name in (("step", "step", "steps"), ("trained_tokens", "tokens", "tokens")):
        plots.lines(
            f"loss_{name}.png",
            f"Loss against {name}",
            [("training", *files.series("loss", x)), ("validation", *files.series("val_loss", x))],
            xlabel,
            "loss",
        )
    plots.lines(
        "learning_rate.png",
        "Learning rate",
        [("learning rate", *files.series("learning_rate"))],
        "step",
        "learning rate",
    )
    steps, norms = files.series("grad_norm")
    if steps:
        clip = files.grad_clip
        clipped = [(s, n) for s, n in zip(steps, norms, strict=True) if clip and n > clip]
        plots.lines(
            "grad_norm.png",
            "Gradient norm",
            [("before clipping", steps, norms)],
            "step",
            "norm",
            note=f"{len(clipped)} of {len(steps)} steps clipped to {clip}" if clip else "",
            marks=(f"clipped (> {clip})", [c[0] for c in clipped], [c[1] for c in clipped]),
        )
    plots.lines(
        "tokens_per_s.png",
        "Throughput",
        [("tokens/s", *files.series("tokens_per_s"))],
        "step",
        "tokens/s",
    )
    plots.lines(
        "peak_memory.png",
        "Peak memory",
        [("peak memory", *files.series("peak_memory_gb"))],
        "step",
        "GB",
    )
    if files.evaluation:
        _draw_scores(plots, files.evaluation)
    return plots.figures


def _draw_scores(plots: _Plots, evaluation: dict[str, Any]) -> None:
    from .evaluate import METRICS_SHOWN

    before, after = evaluation["before"], evaluation["after"]
    names = [n for n in METRICS_SHOWN.get(before["task"], []) if n in before["metrics"]]
    plt = plots.plt
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        values = [before["metrics"][name], after["metrics"][name]]
        bars = ax.bar(["before", "after"], values, color=["#999999", "#1f77b4"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(name)
        ax.margins(y=0.15)
    title = f"{before['task']} on {before['data']} ({before['metrics'].get('examples')} examples)"
    plots.save(fig, "scores.png", f"Task scores before and after training: {title}")
    if "confusion" not in before["metrics"]:
        return
    labels = before.get("labels") or []
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, (when, result) in zip(axes, (("before", before), ("after", after)), strict=True):
        grid = result["metrics"]["confusion"]
        ax.imshow(grid, cmap="Blues")
        ax.set(title=f"{when} training", xlabel="predicted", ylabel="true label")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        top = max((max(row) for row in grid), default=0)
        for i, row in enumerate(grid):
            for j, n in enumerate(row):
                color = "white" if top and n > top / 2 else "black"
                ax.text(j, i, str(n), ha="center", va="center", color=color)
    plots.save(fig, "confusion.png", "Confusion matrix (rows: true label, columns: predicted)")


def page(files: RunFiles, figures: list[Figure]) -> str:
    """The HTML: styles inline, images by file name beside it, no script, no external URL."""
    e = html.escape
    rows = [(k, e(str(v))) for k, v in overview(files)]
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    figs = "\n".join(
        f'<figure id="{e(Path(f.file).stem)}"><img src="{e(f.file)}" alt="{e(f.title)}">'
        f"<figcaption>{e(f.title)}{' — ' + e(f.note) if f.note else ''}"
        f" (<code>{e(f.file)}</code>)</figcaption></figure>"
        for f in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mlxlocal report: {e(files.path.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em;
       color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; vertical-align: top; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
pre {{ background: #f4f4f4; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>Training run {e(str(files.path))}</h1>
<table>
{table}
</table>
<h2>Figures</h2>
{figs}
<h2>Recipe</h2>
<pre>{e(files.recipe_text)}</pre>
</body></html>
"""


def overview(files: RunFiles) -> list[tuple[str, Any]]:
    """The run in a few (name, value) rows: the page's table and `info`'s lines."""
    last = files.metrics[-1]
    _, val = files.series("val_loss")
    method = files.recipe.get("method")
    model = files.recipe.get("model")
    rows: list[tuple[str, Any]] = [
        ("status", files.status + (f" (pid {files.pid})" if files.status == "running" else "")),
        ("model", model.get("path") if isinstance(model, dict) else None),
        ("method", method.get("type") if isinstance(method, dict) else None),
        ("last step", last.get("step")),
        ("last checkpoint", f"step {files.last_checkpoint}" if files.last_checkpoint else "none"),
        ("last loss", _number(last.get("loss"))),
        ("best validation loss", _number(min(val)) if val else "none recorded"),
        ("trained tokens", f"{last.get('trained_tokens', 0):,}"),
        ("peak memory", _gigabytes(max(files.series("peak_memory_gb")[1], default=0))),
    ]
    if files.summary:
        t = files.summary.get("training") or {}
        rows.append(("tokens/s (whole run)", f"{t.get('tokens_per_s', 0):,.0f}"))
    if files.evaluation:
        from .evaluate import HEADLINE

        b, a = files.evaluation["before"], files.evaluation["after"]
        name = HEADLINE.get(b["task"])
        if name in b["metrics"]:
            before, after = b["metrics"][name], a["metrics"][name]
            rows.append((f"{b['task']} {name}", f"{before:.4g} before, {after:.4g} after"))
    return rows


def _gigabytes(value: float) -> str:
    return f"{value:.2f} GB" if value >= 1 else f"{value * 1000:.0f} MB"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def describe_run(path: str | Path) -> dict[str, Any]:
    """`info` on a run directory: its status, where it stands, and where its report is."""
    files = read_run(path)
    report = report_path(files.path)
    data: dict[str, Any] = {"path": str(files.path), "kind": "training run"}
    data |= {k: v for k, v in overview(files)}
    data["report"] = str(report) if report.exists() else f"none yet (mlxlocal report {path})"
    return data


def open_in_browser(page_path: Path) -> bool:
    """Show the page in the user's browser (a local file: no server, no network)."""
    import webbrowser

    return webbrowser.open(page_path.resolve().as_uri())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class Refresher:
    """Rewrites a running run's report at checkpoints, at most once per `every` seconds, so
    drawing never costs a noticeable share of training time; `final` always writes."""

    def __init__(self, run: Path, every: float = 60.0):
        self.run, self.every = run, every
        self.last = time.monotonic()

    def checkpoint(self) -> None:
        if time.monotonic() - self.last >= self.every:
            write_report(self.run)
            self.last = time.monotonic()

    def final(self) -> Path:
        return write_report(self.run)
