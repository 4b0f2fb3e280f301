"""`python -m benchmarks --suite convert --size small`: JSON + a markdown table of ratios."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

from mlxlocal.blas import fast_blas_env

from . import (
    batch,
    constrained,
    convert,
    data,
    distributed,
    generate,
    preference,
    quantize,
    serve,
    train,
)
from .common import machine

SUITES = {
    "convert": convert,
    "generate": generate,
    "batch": batch,
    "constrained": constrained,
    "quantize": quantize,
    "data": data,
    "train": train,
    "serve": serve,
    "distributed": distributed,
    "preference": preference,
}


def main() -> None:
    # MLXLOCAL_BLAS=mkl: restart with MKL preloaded so every measured child runs with it too.
    env = fast_blas_env(dict(os.environ))
    if env:
        os.execve(
            sys.executable,
            [sys.executable, "-m", "benchmarks", *sys.argv[1:]],
            {**os.environ, **env},
        )
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", default="all", help=f"comma list of {', '.join(SUITES)}, or all")
    parser.add_argument(
        "--size",
        default="tiny",
        choices=["smoke", "tiny", "small", "medium"],
        help="smoke: every suite end to end with the least work (CI; its figures mean nothing)",
    )
    parser.add_argument("--reps", type=int, default=3, help="A/B repetitions (medians reported)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, help="where checkpoints are built (default: temp)")
    args = parser.parse_args()
    names = list(SUITES) if args.suite == "all" else args.suite.split(",")
    unknown = set(names) - set(SUITES)
    if unknown:
        parser.error(
            f"unknown suite(s) {', '.join(sorted(unknown))}: choose from {', '.join(SUITES)}"
        )

    work = args.work or Path(tempfile.mkdtemp(prefix="mlxlocal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "size": args.size,
        "reps": args.reps,
        "machine": machine(),
        "results": {},
    }
    rows = ["| figure | mlxlocal | mlx-lm | ratio | target |", "|---|---|---|---|---|"]
    for name in names:
        print(f"running {name} ({args.size}, {args.reps} reps)…", flush=True)
        report["results"][name] = SUITES[name].run(args.size, args.reps, work)
        rows += SUITES[name].table(report["results"][name])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-{args.size}-{'-'.join(names)}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    header = (
        f"{report['date']}, {m['cpu']} × {m['cores']} cores, {m['system']}, MLX {m['mlx']} "
        f"({m['mlx_backend']}, BLAS {m['blas']}), mlx-lm {m['mlx_lm']}, size {args.size}, "
        f"median of {args.reps}"
    )
    markdown = "\n".join([header, "", *rows])
    (args.out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
