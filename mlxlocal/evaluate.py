"""`eval`: a task score for a model (and adapter) on a data file, to see fine-tuning pay off.

Four tasks:
- `perplexity`: exp of the mean NLL of the tokens training would learn (the same masks).
- `classify`: every label is scored as the answer to the prompt, rendered exactly as training
  renders it, by the summed log-likelihood of its tokens (the answer and the end of the turn);
  the best-scoring label is the prediction. Nothing is parsed from free text, so a small model
  is judged on what it prefers, not on how it phrases it.
- `generate`: greedy answers compared with the references: exact match, chrF and BLEU
  (sacrebleu, the reference implementation of both).
- `preference`: on prompt/chosen/rejected rows, how often the model gives the chosen answer a
  higher summed log-likelihood than the rejected one (what DPO's reward accuracy measures
  against a reference, here absolute), and the mean margin in nats.

Rows are read by the data layer as training reads them (jsonl/csv; prompt/completion, chat or
instruction); the last assistant answer of a row is its label or reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .checkpoint.atomic import atomic_file
from .checkpoint.jsonout import strict_dumps
from .choices import EVAL_TASKS
from .constraints import from_options
from .data import (
    BadRow,
    DataSection,
    Example,
    Sample,
    apply_chat_template,
    collate,
    data_format,
    has_chat_template,
    load_examples,
    parse_row,
    read_rows,
    tokenize_sample,
)
from .errors import MlxLocalError
from .generate import LoadedModel, as_loaded, generate
from .progress import bar as progress_bar
from .ranks import SINGLE, World

HEADLINE = {
    "perplexity": "perplexity",
    "classify": "accuracy",
    "generate": "chrf",
    "preference": "accuracy",
}


@dataclass
class EvalResult:
    task: str
    data: str
    metrics: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)  # per-example predictions
    labels: list[str] | None = None

    @property
    def headline(self) -> tuple[str, float]:
        """(name, value) of the task's main figure, for before/after comparisons."""
        name = HEADLINE[self.task]
        return name, self.metrics[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "data": self.data,
            "labels": self.labels,
            "metrics": self.metrics,
            "examples": self.examples,
        }

    def table(self) -> str:
        """The result as the terminal shows it."""
        m = self.metrics
        lines = [f"{self.task} on {self.data} ({m['examples']} examples)"]
        if self.task == "perplexity":
            lines.append(f"perplexity {m['perplexity']:.3f}  (mean NLL {m['nll']:.4f} nats")
            lines[-1] += f" over {m['tokens']:,} tokens)"
        elif self.task == "generate":
            lines.append(
                f"exact match {m['exact_match']:.1%}   chrF {m['chrf']:.1f}   BLEU {m['bleu']:.1f}"
            )
            if "valid" in m:
                lines[-1] += f"   valid {m['valid']:.1%}"
        elif self.task == "preference":
            lines.append(f"accuracy {m['accuracy']:.1%}   mean margin {m['margin']:.3f} nats")
        else:
            lines.append(f"accuracy {m['accuracy']:.1%}   macro-F1 {m['macro_f1']:.3f}")
            lines += _format_grid(
                ["label", "precision", "recall", "f1", "support"],
                [
                    [c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}"]
                    + [str(v["support"])]
                    for c, v in m["per_class"].items()
                ],
            )
            labels = list(m["per_class"])
            lines.append("confusion (rows: true label, columns: predicted)")
            lines += _format_grid(
                ["", *labels],
                [[g, *map(str, row)] for g, row in zip(labels, m["confusion"], strict=True)],
            )
        return "\n".join(lines)


def _format_grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        return "  ".join(cells).rstrip()

    return [line(header), *map(line, rows)]


def evaluate(
    model: str | Path | LoadedModel,
    data: str | Path | DataSection,
    task: str,
    adapter: str | Path | None = None,
    labels: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_tokens: int = 64,
    fields: dict[str, str] | None = None,
    encoding: str | None = None,
    note: Callable[[str], None] = lambda _: None,
    world: World = SINGLE,
    **constraint: Any,
) -> EvalResult:
    """Score `model` (a folder or a `load_model()` result) on `data` for `task`.

    `data` is a data file (or `builtin:NAME`) read with `fields` (a `data.fields` mapping) and
    `encoding`, or a recipe data section whose `train` names the file (so field mappings and
    the system prompt apply as in training). `note` hears how an ambiguous format was decided.
    For `generate`, a constraint (`choices`, `regex`, `json_schema`, `json_object`: see
    `generate.stream`) shapes every answer, and the metrics add the fraction that satisfied it
    (`valid`). Under several ranks (`world`), each scores its share and all get the whole result.
    """
    if task not in EVAL_TASKS:
        raise MlxLocalError(f"unknown task {task!r}; use one of: {', '.join(EVAL_TASKS)}")
    if task != "generate" and any(v not in (None, False) for v in constraint.values()):
        raise MlxLocalError("constraints (--choices, --regex...) apply to --task generate only")
    from_options(**constraint)  # a bad constraint fails before the model loads
    if batch_size < 1 or (limit is not None and limit < 1):
        raise MlxLocalError("batch size and limit must be ≥ 1")
    if isinstance(data, DataSection):
        section = data
    else:
        section = DataSection(train=str(data), fields=fields or {}, encoding=encoding)
    section = section.model_copy(update={"valid": None, "valid_fraction": None, "packing": False})
    lm = as_loaded(model, adapter)
    training = lm.model.training
    lm.model.eval()
    try:
        if task in ("perplexity", "preference"):
            return _answer_scores(lm, section, task, limit, batch_size, note, world)
        samples = answered_samples(section, task, limit, note)
        if task == "classify":
            return _classify(lm, section, samples, labels, batch_size, world)
        return _generate(lm, section, samples, max_tokens, constraint, world)
    finally:
        lm.model.train(training)


def answer_logprobs(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    step: Callable = lambda: None,
    world: World = SINGLE,
) -> list[tuple[float, int]]:
    """(Σ log p, token count) over each example's weighted tokens, teacher-forced; under several
    ranks each scores every W-th batch and all get every score."""
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))  # less padding
    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for c in world.mine(len(chunks)):
        chunk = chunks[c]
        longest = max(len(examples[i].tokens) for i in chunk)
        b = collate([[examples[i]] for i in chunk], longest)
        w = b.weights[:, 1:]
        logits = model(b.tokens[:, :-1]).astype(mx.float32)
        logp = -nn.losses.cross_entropy(logits, b.tokens[:, 1:]) * w
        sums, counts = logp.sum(axis=1), w.sum(axis=1)
        mx.eval(sums, counts)
        for i, s, n in zip(chunk, sums.tolist(), counts.tolist(), strict=True):
            scores[i] = (s, int(n))
        step(len(chunk))
    if world.size > 1:
        mine = [i for c in world.mine(len(chunks)) for i in chunks[c]]
        merged = world.merge(len(examples), mine, [list(scores[i]) for i in mine])
        scores = [(s, int(n)) for s, n in merged]
    return scores


def _answer_scores(
    lm: LoadedModel,
    section: DataSection,
    task: str,
    limit,
    batch_size: int,
    note: Callable[[str], None],
    world: World,
) -> EvalResult:
    """perplexity and preference: the answers' teacher-forced log-probabilities, summed up."""
    if task == "preference":
        pairs = preference_pairs(section, lm.tokenizer, note)[:limit]
        answers, unit = [e for p in pairs for e in (p.chosen, p.rejected)], "answers"
    else:
        examples, _ = load_examples(section, lm.tokenizer, "train", note)  # of pairs: the chosen
        answers, unit = [getattr(e, "chosen", e) for e in examples[:limit]], "ex"
    with progress_bar(task, len(answers), unit) as bar:
        scores = answer_logprobs(lm.model, answers, batch_size, bar.update, world)
    summed = _preference_metrics if task == "preference" else _perplexity_metrics
    return EvalResult(task, section.train, *summed(scores))


def _perplexity_metrics(scores: list[tuple[float, int]]) -> tuple[dict, list[dict]]:
    """exp of the mean NLL per answer token; each example's NLL."""
    nll, tokens = -sum(s for s, _ in scores), sum(n for _, n in scores)
    metrics = {
        "examples": len(scores),
        "tokens": tokens,
        "nll": nll / tokens,
        "perplexity": math.exp(nll / tokens),
    }
    return metrics, [{"nll": -s / max(n, 1), "tokens": n} for s, n in scores]


def _preference_metrics(scores: list[tuple[float, int]]) -> tuple[dict, list[dict]]:
    """Of (chosen, rejected) scores in turn: how often and by how much the chosen wins."""
    chosen, rejected = [s for s, _ in scores[::2]], [s for s, _ in scores[1::2]]
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    metrics = {
        "examples": len(margins),
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin": sum(margins) / len(margins),
    }
    per_example = [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)]
    return metrics, per_example


def preference_pairs(section: DataSection, tokenizer, note: Callable[[str], None]) -> list:
    """The data's preference pairs; other formats are refused."""
    pairs, report = load_examples(section, tokenizer, "train", note)
    if report.format != "preference":
        raise MlxLocalError(
            f"{section.train}: the preference task needs prompt/chosen/rejected rows, not "
            f"{report.format} data"
        )
    return pairs


def answered_samples(
    section: DataSection, task: str, limit: int | None, note: Callable[[str], None] = lambda _: None
) -> list[Sample]:
    """Rows as conversations whose last message is the assistant's answer (label/reference).

    Bad rows stop the evaluation or are skipped (data.bad_lines), as in training.
    """
    rows, _ = read_rows(section.train, section.bad_lines == "skip", section.encoding)
    rows = rows[:limit]
    fmt = data_format(rows, section, section.train, note)
    what = "label" if task == "classify" else "reference answer"
    if fmt == "text":
        raise MlxLocalError(
            f"{section.train}: {task} needs a {what} for every row: use prompt/completion, chat "
            "or instruction/output data (the answer is the last assistant message)"
        )
    samples = []
    for row in rows:
        try:
            sample = parse_row(row, fmt, section)
            last = sample.messages[-1]
            if last["role"] != "assistant" or not str(last.get("content") or "").strip():
                raise BadRow(f"no {what} (the last message must be the answer)")
        except BadRow as e:
            if section.bad_lines == "skip":
                continue
            raise MlxLocalError(
                f"{row.where}: {e}; {task} needs a {what} in every row (or set "
                "data.bad_lines: skip)"
            ) from e
        samples.append(sample)
    return samples


def _with_answer(sample: Sample, answer: str) -> Sample:
    return Sample(messages=[*sample.messages[:-1], {"role": "assistant", "content": answer}])


def _classify(
    lm: LoadedModel,
    section: DataSection,
    samples: list[Sample],
    labels,
    batch_size: int,
    world: World,
) -> EvalResult:
    gold = [str(s.messages[-1]["content"]).strip() for s in samples]
    labels = check_labels(lm.tokenizer, section.train, gold, labels)
    chat = has_chat_template(lm.tokenizer)
    try:
        candidates = [
            tokenize_sample(_with_answer(s, label), lm.tokenizer, chat, False)
            for s in samples
            for label in labels
        ]
    except BadRow as e:  # the chat template fails on a row
        raise MlxLocalError(f"{section.train}: {e}") from e
    with progress_bar("classify", len(candidates), "candidate") as bar:
        scores = answer_logprobs(lm.model, candidates, batch_size, bar.update, world)
    k = len(labels)
    examples, predicted = [], []
    for i, truth in enumerate(gold):
        logps = [s for s, _ in scores[i * k : (i + 1) * k]]
        best = labels[max(range(k), key=logps.__getitem__)]
        predicted.append(best)
        examples.append(
            {
                "prompt": samples[i].messages[-2]["content"],
                "label": truth,
                "predicted": best,
                "correct": best == truth,
                "log_likelihoods": dict(zip(labels, logps, strict=True)),
            }
        )
    metrics = {"examples": len(gold), **classification_metrics(gold, predicted, labels)}
    return EvalResult("classify", section.train, metrics, examples, labels)


def check_labels(tokenizer, where: str, gold: list[str], labels) -> list[str]:
    if labels:
        labels = [str(label).strip() for label in labels]
        for label in labels:
            if not label or not tokenizer.encode(label, add_special_tokens=False):
                raise MlxLocalError(
                    f"label {label!r} becomes no tokens with this model's tokenizer; use a word"
                )
        unknown = sorted(set(gold) - set(labels))
        if unknown:
            raise MlxLocalError(
                f"{where}: the data has label {unknown[0]!r}, which is not one of the labels "
                f"given ({', '.join(labels)}); add it or fix the data"
            )
    else:
        labels = sorted(set(gold))
    if len(set(labels)) < 2:
        raise MlxLocalError(
            f"{where}: classify needs at least two labels (found {labels}); give them with "
            "--labels a,b or eval.labels"
        )
    return list(dict.fromkeys(labels))


def classification_metrics(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    confusion[i][j] counts examples of true label i predicted as j. A class never predicted
    (or never present) has precision (recall) 0, as scikit-learn reports it.
    """
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        confusion[index[g]][index[p]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted_i = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return {
        "accuracy": correct / len(gold) if gold else 0.0,
        "macro_f1": sum(v["f1"] for v in per_class.values()) / len(labels),
        "per_class": per_class,
        "confusion": confusion,
    }


def prompt_ids(tokenizer, sample: Sample) -> list[int]:
    """The tokens of a row's conversation up to its answer, as training renders them."""
    context = sample.messages[:-1]
    if has_chat_template(tokenizer):
        return list(apply_chat_template(tokenizer, context, add_generation_prompt=True))
    return list(tokenizer.encode("\n\n".join(m["content"] for m in context)))


def _generate(
    lm: LoadedModel,
    section: DataSection,
    samples: list[Sample],
    max_tokens: int,
    constraint: dict[str, Any],
    world: World,
) -> EvalResult:
    import sacrebleu

    references = [str(s.messages[-1]["content"]).strip() for s in samples]
    mine = list(world.mine(len(samples)))
    answers, valid = [], []
    for i in progress_bar("generate", len(mine), "ex", mine):
        result = generate(
            lm, prompt_ids(lm.tokenizer, samples[i]), max_tokens=max_tokens, **constraint
        )
        answers.append(result.text.strip())
        valid.append([-1.0 if result.valid is None else float(result.valid)])
    answers = world.merge_texts(len(samples), mine, answers)
    flags = [None if v < 0 else bool(v) for (v,) in world.merge(len(samples), mine, valid)]
    examples = []
    for sample, ref, answer, ok in zip(samples, references, answers, flags, strict=True):
        checked = {} if ok is None else {"valid": ok}
        examples.append(
            {
                "prompt": sample.messages[-2]["content"],
                "reference": ref,
                "answer": answer,
                "exact_match": answer == ref,
                "chrf": sacrebleu.sentence_chrf(answer, [ref]).score,
                **checked,
            }
        )
    metrics = {
        "examples": len(samples),
        "exact_match": sum(e["exact_match"] for e in examples) / len(samples),
        "chrf": sacrebleu.corpus_chrf(answers, [references]).score,
        "bleu": sacrebleu.corpus_bleu(answers, [references]).score,
    }
    if examples and "valid" in examples[0]:
        metrics["valid"] = sum(e["valid"] for e in examples) / len(examples)
    return EvalResult("generate", section.train, metrics, examples)


def write_results(result: EvalResult | dict, out: str | Path, force: bool = False) -> Path:
    """Write a result (or a before/after record) as JSON, atomically; an existing file is
    replaced only with `force`."""
    record = result.to_json() if isinstance(result, EvalResult) else result
    out = Path(out)
    with atomic_file(out, force=force) as tmp:
        tmp.write_text(strict_dumps(record, indent=2, ensure_ascii=False))
    return out


def evaluate_recipe(
    recipe, model, tokenizer, path: Path, when: str, echo, world: World = SINGLE
) -> EvalResult | None:
    """The recipe's task evaluation (its `eval` section) of an in-memory model, or None; under
    several ranks each scores its share."""
    e = recipe.eval
    if e.task is None:
        return None
    from .models import context_length, read_config

    data = recipe.data.model_copy(update={"train": e.data or recipe.data.valid})
    echo(f"evaluating {e.task} {when} on {data.train}")
    lm = LoadedModel(model, tokenizer, context_length(read_config(path)), path)
    return evaluate(lm, data, e.task, labels=e.labels, limit=e.limit, world=world)


METRICS_SHOWN = {
    "perplexity": ["perplexity", "nll"],
    "classify": ["accuracy", "macro_f1"],
    "generate": ["exact_match", "chrf", "bleu"],
    "preference": ["accuracy", "margin"],
}


def side_by_side(before: EvalResult, after: EvalResult) -> list[str]:
    """The task's metrics before and after training, as a small table."""
    rows = []
    for name in METRICS_SHOWN[before.task]:
        fmt = "{:.1%}" if name in ("accuracy", "exact_match") else "{:.3f}"
        rows.append([name, fmt.format(before.metrics[name]), fmt.format(after.metrics[name])])
    head = f"{before.task} on {before.data} ({before.metrics['examples']} examples):"
    return [head, *("  " + line for line in _format_grid(["", "before", "after"], rows))]
