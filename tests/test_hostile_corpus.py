"""The CI subset of the hostile corpus (hostile_corpus.py; `make fuzz` runs all of it and random
mutations): a few hostile inputs for every verb, each in its own process through the installed
CLI — exit 1, one `error:` line, no traceback, nothing written outside the output, no leftovers,
no checkpoint code run, peak RSS under hostile_corpus.RSS_BUDGET_MB."""

from __future__ import annotations

import os

from hostile_corpus import VERBS, Corpus, base_from, run_cases, summary


def test_every_verb_refuses_hostile_input_in_one_line_and_bounded_memory(
    checkpoints, tiny_mlx, tmp_path
):
    base = base_from(checkpoints("llama"), tiny_mlx, tmp_path / "base")
    cases = Corpus(base, tmp_path / "corpus").cases(ci_only=True)
    assert {c.verb for c in cases} == set(VERBS)
    outcomes = run_cases(cases, jobs=min(4, max(2, os.cpu_count() or 1)), logs=tmp_path / "logs")
    print(summary(outcomes))
    failing = [
        f"{o.case.verb} {o.case.kind}: {'; '.join(o.problems)}\n  {o.output.strip()[-400:]}"
        for o in outcomes
        if o.problems
    ]
    assert not failing, "\n".join(failing)
