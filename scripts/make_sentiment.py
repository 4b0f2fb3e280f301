"""Write mlxlocal's small sentiment data set: short product and film reviews from templates.

Deterministic (a fixed seed), so the shipped files can be rebuilt and checked:
    python scripts/make_sentiment.py   # writes mlxlocal/datasets/sentiment-{train,test}.jsonl
Each line is a prompt/completion pair whose completion, the label, is positive or negative.
The held-out split uses the same words in sentences the training split does not contain.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ITEMS = ["film", "book", "phone", "hotel", "meal", "game", "album", "laptop", "show", "chair"]
GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "brilliant", "fun"]
BAD = ["awful", "terrible", "boring", "broken", "dreadful", "horrible", "useless", "dull"]
LIKE = ["loved", "enjoyed", "adored", "liked"]
HATE = ["hated", "regretted", "disliked", "returned"]
TEMPLATES = [
    "The {item} was {adj}.",
    "What a {adj} {item}!",
    "I {verb} this {item}.",
    "This {item} is {adj}, honestly.",
    "I {verb} the {item}; it was {adj}.",
    "Honestly, a {adj} {item}.",
]
PROMPT = "{review}"
OUT = Path(__file__).resolve().parent.parent / "mlxlocal" / "datasets"


def reviews() -> list[tuple[str, str]]:
    """Every (review, label) the templates and word lists make, in a fixed order."""
    out = []
    for label, adjs, verbs in (("positive", GOOD, LIKE), ("negative", BAD, HATE)):
        for template in TEMPLATES:
            for item in ITEMS:
                for adj in adjs:
                    verb = verbs[(ITEMS.index(item) + adjs.index(adj)) % len(verbs)]
                    out.append((template.format(item=item, adj=adj, verb=verb), label))
    return sorted(set(out))


def main(train: int = 400, test: int = 100, seed: int = 0) -> None:
    rows = reviews()
    random.Random(seed).shuffle(rows)
    for name, part in (("train", rows[:train]), ("test", rows[train : train + test])):
        lines = [
            json.dumps({"prompt": PROMPT.format(review=r), "completion": label})
            for r, label in part
        ]
        (OUT / f"sentiment-{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
