"""Task evaluation: label scoring, metrics, perplexity, generation, bad input, the CLI."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxlocal import MlxLocalError
from mlxlocal.cli import cli
from mlxlocal.evaluate import classification_metrics, evaluate
from mlxlocal.generate import generate

ROWS = [
    ("The film was great.", "good"),
    ("I hated this phone.", "bad"),
    ("A dull book.", "meh"),
    ("What a superb meal!", "good"),
    ("The hotel was awful, honestly.", "bad"),
]


def write_rows(path, rows, key="completion"):
    path.write_text("".join(json.dumps({"prompt": p, key: c}) + "\n" for p, c in rows))
    return path


def answer_logprob(lm, prompt: str, answer: str) -> tuple[float, int]:
    """Σ log p of the answer's tokens after the prompt, one unpadded sequence, by hand."""
    tok = lm.tokenizer
    user = [{"role": "user", "content": prompt}]
    context = tok.apply_chat_template(user, add_generation_prompt=True)
    full = tok.apply_chat_template([*user, {"role": "assistant", "content": answer}])
    assert full[: len(context)] == context
    logits = lm.model(mx.array([full[:-1]])).astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
    positions = range(len(context), len(full))
    return sum(float(logp[t - 1, full[t]]) for t in positions), len(positions)


def test_classify_picks_the_label_of_highest_log_likelihood(tiny_lm, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    result = evaluate(tiny_lm, data, "classify", batch_size=4)
    assert result.labels == ["bad", "good", "meh"]
    for (prompt, _), example in zip(ROWS, result.examples, strict=True):
        direct = {label: answer_logprob(tiny_lm, prompt, label)[0] for label in result.labels}
        for label, score in direct.items():
            assert example["log_likelihoods"][label] == pytest.approx(score, abs=1e-4)
        assert example["predicted"] == max(direct, key=direct.get)
    # The scores differ between labels: the choice is the model's, not a tie broken by order.
    assert len({round(s, 3) for s in result.examples[0]["log_likelihoods"].values()}) == 3


def test_classification_metrics_match_hand_computed_values():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    m = classification_metrics(gold, pred, ["a", "b", "c"])
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_perplexity_is_exp_of_the_mean_answer_token_nll(tiny_lm, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    result = evaluate(tiny_lm, data, "perplexity", batch_size=2)
    scores = [answer_logprob(tiny_lm, p, c) for p, c in ROWS]
    nll = -sum(s for s, _ in scores) / sum(n for _, n in scores)
    assert result.metrics["tokens"] == sum(n for _, n in scores)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_preference_scores_both_answers_and_counts_the_chosen_wins(tiny_lm, tmp_path):
    pairs = [(p, c, "No.") for p, c in ROWS[:3]]
    pairs += [(p, r, c) for p, c, r in pairs]  # each pair swapped: exactly half are won
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = evaluate(tiny_lm, data, "preference", batch_size=4)
    direct = [
        (answer_logprob(tiny_lm, p, c)[0], answer_logprob(tiny_lm, p, r)[0]) for p, c, r in pairs
    ]
    for (chosen, rejected), example in zip(direct, result.examples, strict=True):
        assert example == pytest.approx({"chosen": chosen, "rejected": rejected}, abs=1e-4)
    assert all(abs(c - r) > 1e-3 for c, r in direct)  # no ties: each pair is won or lost
    expected = {"examples": 6, "accuracy": 0.5, "margin": 0.0}
    assert result.metrics == pytest.approx(expected, abs=1e-4)
    margins = [c - r for c, r in direct[:3]]  # the first three alone: not symmetric
    wins = sum(m > 0 for m in margins)
    expected = {"examples": 3, "accuracy": wins / 3, "margin": sum(margins) / 3}
    first = evaluate(tiny_lm, data, "preference", limit=3)
    assert first.metrics == pytest.approx(expected, abs=1e-4)


def test_generate_compares_greedy_answers_with_references(tiny_lm, tmp_path):
    prompts = [p for p, _ in ROWS[:2]]
    own = generate(tiny_lm, prompts[0], max_tokens=8).text.strip()
    assert own, "the greedy answer should not be empty"
    data = write_rows(tmp_path / "rows.jsonl", [(prompts[0], own), (prompts[1], "zzz qqq")])
    result = evaluate(tiny_lm, data, "generate", max_tokens=8)
    assert [e["answer"] for e in result.examples][0] == own
    assert [e["exact_match"] for e in result.examples] == [True, False]
    assert result.metrics["exact_match"] == 0.5
    assert result.examples[0]["chrf"] == pytest.approx(100.0)
    assert 0 < result.metrics["chrf"] < 100


def test_limit_evaluates_only_the_first_rows(tiny_lm, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    result = evaluate(tiny_lm, data, "classify", labels=["good", "bad", "meh"], limit=2)
    assert result.metrics["examples"] == 2 and len(result.examples) == 2


@pytest.mark.parametrize(
    "rows, task, labels, message",
    [
        ([("Great.", "good"), ("Bad.", "ugly")], "classify", ["good", "bad"], "not one of"),
        ([("Great.", "good"), ("Bad.", "")], "classify", None, "needs a label"),
        ([("Great.", "good"), ("Bad.", "bad")], "classify", ["good", " "], "no tokens"),
        ([("Great.", "good"), ("Fine.", "good")], "classify", None, "at least two labels"),
        ([("Great.", "good"), ("Bad.", "")], "generate", None, "needs a reference"),
        ([], "classify", None, "no examples"),
        ([], "perplexity", None, "no examples"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_lm, tmp_path, rows, task, labels, message):
    data = write_rows(tmp_path / "rows.jsonl", rows)
    with pytest.raises(MlxLocalError, match=message):
        evaluate(tiny_lm, data, task, labels=labels)


def test_text_data_has_no_answers_to_classify_or_generate(tiny_lm, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "Just some text."}) + "\n")
    for task in ("classify", "generate"):
        with pytest.raises(MlxLocalError, match="needs a"):
            evaluate(tiny_lm, data, task)
    assert evaluate(tiny_lm, data, "perplexity").metrics["tokens"] > 0


def test_cli_prints_a_table_and_writes_per_example_results(tiny_mlx, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "results.json"
    args = ["eval", str(tiny_mlx), "--data", str(data), "--task", "classify", "--output", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "confusion" in result.output
    record = json.loads(out.read_text())
    assert len(record["examples"]) == len(ROWS) and "macro_f1" in record["metrics"]
    bad = CliRunner().invoke(cli, [*args[:6], "--labels", "good,bad"])
    assert bad.exit_code == 1 and "error: " in bad.output and "meh" in bad.output


def test_a_run_evaluates_before_and_after_training(mlx_checkpoints, tmp_path):
    from helpers import write_recipe

    from mlxlocal.recipe import load_recipe
    from mlxlocal.train.run import run_recipe

    task = {"task": "classify", "data": "builtin:sentiment-test.jsonl", "limit": 6}
    path = write_recipe(tmp_path, mlx_checkpoints("llama"), eval=task)
    summary = run_recipe(load_recipe(path))
    lines = "\n".join(summary.lines())
    assert "classify on builtin:sentiment-test.jsonl (6 examples)" in lines
    assert "before" in lines and "after" in lines and "accuracy" in lines
    record = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert record["before"]["labels"] == ["negative", "positive"]
    before = [e["log_likelihoods"] for e in record["before"]["examples"]]
    after = [e["log_likelihoods"] for e in record["after"]["examples"]]
    assert len(before) == len(after) == 6 and before != after  # the adapters changed the scores
    summary_json = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary_json["evaluation"]["after"]["accuracy"] == summary.after.metrics["accuracy"]


def test_recipe_eval_section_is_checked(tmp_path, mlx_checkpoints):
    from helpers import write_recipe

    from mlxlocal.recipe import load_recipe

    model = mlx_checkpoints("llama")
    with pytest.raises(MlxLocalError, match="eval.data: eval.task needs held-out data"):
        load_recipe(write_recipe(tmp_path, model, eval={"task": "classify"}))
    with pytest.raises(MlxLocalError, match="eval.task: set it"):
        load_recipe(write_recipe(tmp_path, model, eval={"labels": ["a", "b"]}))
    task = {"task": "generate", "data": "t.jsonl"}
    recipe = load_recipe(write_recipe(tmp_path, model, eval=task))
    assert recipe.eval.data == str(tmp_path / "t.jsonl")
