"""Data-parallel training on MLX's own engine: 2 ranks (`mlx.launch`, ring back end, loopback)
against 1 process with the same global batch, a rank killed mid-run, and bad launch input.

The ranks are child processes that talk over loopback sockets; this module opts in to
loopback (as the serve tests do) and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import CLI, assert_same_run, compiling_env, read_metrics, run_cli, write_recipe
from serving import loopback_only as no_network  # noqa: F401 - replaces conftest's fixture

from mlxlocal.cli import cli
from mlxlocal.ranks import World
from mlxlocal.train.distributed import rank_share, take_step
from mlxlocal.train.launch import Outcome

STEPS = 6
# Per rank: batch_size 2 × grad_accumulation 1; the single process takes the same global
# batch (2 × 2 × 1) as grad_accumulation 2.
RECIPE = {
    "training__batch_size": 2,
    "training__steps": STEPS,
    "checkpoint__every": 2,
    "data__valid_fraction": 0.2,
    "eval__every": 3,
    # The before/after task scores, split over the ranks and gathered.
    "eval__task": "perplexity",
    "eval__data": "builtin:tiny-chat.jsonl",
    "eval__limit": 7,
}


@pytest.mark.parametrize("size,per_rank", [(1, 3), (2, 1), (2, 3), (4, 2)])
def test_rank_shares_are_disjoint_and_complete(size, per_rank):
    count = size * per_rank
    shares = [rank_share(count, r, size) for r in range(size)]
    assert all(len(s) == per_rank for s in shares)
    assert sorted(i for s in shares for i in s) == list(range(count))


def test_each_rank_draws_its_share_of_the_single_process_batch_order():
    """Over steps and an epoch boundary, the ranks' micro-batches together are exactly the
    single process's, each once, and every rank agrees on where the step ends."""

    def stream():  # (epoch, next index, batch), 5 batches an epoch
        for epoch in range(3):
            for i in range(5):
                yield epoch, i + 1, (epoch, i)

    single = stream()
    ranks = [stream() for _ in range(2)]
    for _ in range(3):  # steps of 2 per rank = 4 micro-batches
        want = take_step(single, 4, World())
        got = [take_step(s, 2, World(rank=r, size=2)) for r, s in enumerate(ranks)]
        assert {g[:2] for g in got} == {want[:2]}
        drawn = [b for g in got for b in g[2]]
        assert sorted(drawn) == sorted(want[2]) and len(set(drawn)) == len(drawn)


def test_a_failing_rank_is_reported_although_the_launcher_exits_0():
    out = Outcome()
    for line in [
        "step 1",
        "\x1b[33m[WARN] Node with rank 1 exited with code -9 \x1b[0m",
        "[WARN] Node with rank 0 was killed",
    ]:
        out.read(line)
    assert out.failure(0).startswith("rank 1 was killed by signal 9")
    out = Outcome()
    for line in ["error: rank 0: the data is bad", "[WARN] Node with rank 0 exited with code 1"]:
        out.read(line)
    assert out.failure(0) == "rank 0: the data is bad"
    assert Outcome().failure(0) is None


@pytest.fixture(scope="module")
def tiny(mlx_checkpoints):
    return mlx_checkpoints("llama")


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one")
    recipe = write_recipe(folder, tiny, training__grad_accumulation=2, **RECIPE)
    result = run_cli("run", str(recipe))
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.fixture(scope="module")
def two_ranks(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    recipe = write_recipe(folder, tiny, **RECIPE)
    result = run_cli("run", str(recipe), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    return folder / "run"


def test_two_ranks_train_as_one_process_with_the_same_global_batch(one_process, two_ranks):
    ones, twos = read_metrics(one_process), read_metrics(two_ranks)
    assert [m["step"] for m in twos] == list(range(1, STEPS + 1))
    for a, b in zip(ones, twos, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), f"step {b['step']}"
        assert (b["tokens"], b["trained_tokens"]) == (a["tokens"], a["trained_tokens"])
        assert ("val_loss" in b) == ("val_loss" in a)
        if "val_loss" in a:  # split over the ranks and gathered
            assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
        assert len(b["rank_peak_memory_gb"]) == 2 and b["peak_memory_gb"] > 0
    theirs = mx.load(str(one_process / "adapters" / "adapters.safetensors"))
    ours = mx.load(str(two_ranks / "adapters" / "adapters.safetensors"))
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_allclose(np.array(ours[name]), np.array(value), atol=1e-5)
    summary = json.loads((two_ranks / "summary.json").read_text())
    assert summary["world_size"] == 2
    theirs = json.loads((one_process / "evaluation.json").read_text())
    ours = json.loads((two_ranks / "evaluation.json").read_text())
    for when in ("before", "after"):
        assert ours[when]["metrics"]["examples"] == theirs[when]["metrics"]["examples"] == 7
        assert ours[when]["metrics"]["nll"] == pytest.approx(theirs[when]["metrics"]["nll"], 1e-5)
    assert json.loads((two_ranks / f"step-{STEPS}" / "state.json").read_text())["world_size"] == 2


def rank_pid(recipe: Path, rank: int) -> int | None:
    """The process of `rank` running `recipe` (mlx.launch exports MLX_RANK to it)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(recipe).encode() in cmdline and f"MLX_RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_rank_killed_mid_run_fails_the_run_which_then_resumes_exactly(tiny, tmp_path, two_ranks):
    recipe = write_recipe(tmp_path, tiny, **RECIPE)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "run", str(recipe), "--nproc", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=compiling_env(),
    )
    try:
        while not (run / "latest").exists() and proc.poll() is None:  # step 2 checkpointed
            time.sleep(0.05)
        pid = rank_pid(recipe, 1)
        assert pid is not None and proc.poll() is None
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("error: rank 1 was killed by signal 9")
    assert not (run / "summary.json").exists()
    for step in run.glob("step-*"):  # nothing half-written where a resume would look
        assert (step / "state.json").exists()
    assert (run / (run / "latest").read_text().strip() / "state.json").exists()

    result = run_cli("run", str(recipe), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    assert_same_run(two_ranks, run, STEPS)


def test_resuming_with_another_number_of_ranks_is_refused(two_ranks, tmp_path):
    recipe = two_ranks.parent / "recipe.yaml"
    result = run_cli("run", str(recipe), "--extend", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {two_ranks / f'step-{STEPS}'} was trained by 2 ranks, this run has 1: resume "
        "it with 2 ranks (--nproc 2), or choose another output"
    ]
    assert (two_ranks / "summary.json").exists()  # the finished run is as it was


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "no such hostfile"),
        ("{not json", "not JSON"),
        ('{"ssh": "a"}', "expected a JSON list of"),
        ('[{"ips": ["10.0.0.1"]}]', "entry 1 is not of the form"),
        ('[{"ssh": "localhost"}, {"ssh": "nohost.invalid"}]', "'nohost.invalid' (entry 2)"),
    ],
)
def test_a_bad_hostfile_is_one_clear_line(tiny, tmp_path, content, expected):
    recipe = write_recipe(tmp_path, tiny, **RECIPE)
    hosts = tmp_path / "hosts.json"
    if content is not None:
        hosts.write_text(content)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--hosts", str(hosts)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": {"type": "full"}, "data__packing": False},  # length buckets
        {"model__quantize": {"bits": 4, "group_size": 32}, "training__grad_clip": 0.5},  # QLoRA
    ],
    ids=["full-buckets", "qlora-packed-clipped"],
)
def test_full_fine_tuning_and_qlora_train_alike_on_two_ranks(tiny, tmp_path, compiled, overrides):
    from mlxlocal.recipe import load_recipe
    from mlxlocal.train.run import run_recipe

    settings = {"training__batch_size": 2, "training__steps": 2, **overrides}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    one = write_recipe(tmp_path / "one", tiny, training__grad_accumulation=2, **settings)
    run_recipe(load_recipe(one))
    two = write_recipe(tmp_path / "two", tiny, **settings)
    result = run_cli("run", str(two), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    ones, twos = read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")
    for a, b in zip(ones, twos, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b.get("grad_norm") == pytest.approx(a.get("grad_norm"), abs=1e-5)
    theirs = mx.load(str(tmp_path / "one" / "run" / "adapters" / "adapters.safetensors"))
    ours = mx.load(str(tmp_path / "two" / "run" / "adapters" / "adapters.safetensors"))
    for name, value in theirs.items():
        np.testing.assert_allclose(np.array(ours[name]), np.array(value), atol=1e-5)


SCORER = """
import json, sys
from mlxlocal.evaluate import evaluate
from mlxlocal.generate import load_model
from mlxlocal.ranks import init

world = init()
lm = load_model(sys.argv[1])
out = {
    "world": [world.rank, world.size],
    "classify": evaluate(lm, "builtin:sentiment-test.jsonl", "classify", limit=7, batch_size=2,
                         world=world).to_json(),
    "generate": evaluate(lm, "builtin:tiny-chat.jsonl", "generate", limit=5, max_tokens=6,
                         world=world).to_json(),
}
with open(sys.argv[2] + f"-{world.rank}.json", "w") as f:
    json.dump(out, f)
"""


def test_task_scores_are_split_over_ranks_and_every_rank_gets_them_whole(tiny, tmp_path):
    from mlxlocal.evaluate import evaluate
    from mlxlocal.generate import load_model
    from mlxlocal.train.launch import launch_command

    script = tmp_path / "score.py"
    script.write_text(SCORER)
    command = launch_command([], 2, None)
    command = command[: command.index("--") + 1]
    command += [sys.executable, str(script), str(tiny), str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lm = load_model(tiny)
    alone = {
        "classify": evaluate(
            lm, "builtin:sentiment-test.jsonl", "classify", limit=7, batch_size=2
        ).to_json(),
        "generate": evaluate(
            lm, "builtin:tiny-chat.jsonl", "generate", limit=5, max_tokens=6
        ).to_json(),
    }
    for rank in (0, 1):
        ranked = json.loads((tmp_path / f"out-{rank}.json").read_text())
        assert ranked["world"] == [rank, 2]
        # 7 examples × 2 labels in batches of 2: 7 batches, 4 on rank 0 and 3 on rank 1.
        c, a = ranked["classify"], alone["classify"]
        assert [e["predicted"] for e in c["examples"]] == [e["predicted"] for e in a["examples"]]
        for mine, theirs in zip(c["examples"], a["examples"], strict=True):
            for label, value in theirs["log_likelihoods"].items():
                assert mine["log_likelihoods"][label] == pytest.approx(value, abs=1e-5)
        assert c["metrics"]["confusion"] == a["metrics"]["confusion"]
        # Generated text (bytes gathered) comes back whole and in order.
        assert ranked["generate"]["examples"] == alone["generate"]["examples"]
