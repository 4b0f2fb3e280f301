"""Write mlxlocal's small preference set: a polite answer preferred to a curt one.

Deterministic (a fixed seed), so the shipped files can be rebuilt and checked:
    python scripts/make_preference.py   # writes mlxlocal/datasets/polite-{train,test}.jsonl
The prompts are the shipped sentiment reviews (scripts/make_sentiment.py), answered as a support
agent would: `chosen` thanks the customer and offers help, `rejected` is a curt reply of about
the same length.
The held-out split has reviews and answer wordings the training split does not.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATASETS = Path(__file__).resolve().parent.parent / "mlxlocal" / "datasets"
POLITE = {
    "positive": [
        "Thank you so much for your kind words! We are delighted you enjoyed it.",
        "Thank you for sharing this! We are so glad it made your day.",
        "Thank you, that is lovely to hear! Please let us know if we can help.",
        "We really appreciate it, thank you! We hope you enjoy it for a long time.",
    ],
    "negative": [
        "We are so sorry to hear that. Please reply and we will make it right.",
        "Thank you for telling us, and we apologise. We would love to help fix this.",
        "We are truly sorry it let you down. Please contact us and we will help.",
        "Sorry about this, and thank you for your patience. We will sort it out.",
    ],
}
# As long as the polite replies, so the preference is for the tone, not for the length.
CURT = {
    "positive": [
        "Fine, we read it. There is nothing more to say about it, so do not write again.",
        "Noted. We do not need to hear about it, and we have other things to do today.",
        "Ok, whatever. It is just a product, so there is no need to tell us about it.",
        "Good for you. We have no time for this, so please keep such notes to yourself.",
    ],
    "negative": [
        "That is your problem, not ours. We will not do anything about it, so stop asking.",
        "Too bad. You bought it, so you deal with it. Do not contact us about this again.",
        "So what? Everyone else is happy with it, so the fault must be yours, not ours.",
        "Not our problem. Read the manual next time and stop wasting our time with this.",
    ],
}


def rows(split: str) -> list[dict[str, str]]:
    lines = (DATASETS / f"sentiment-{split}.jsonl").read_text().splitlines()
    held_out = split == "test"
    rng = random.Random(0 if not held_out else 1)
    out = []
    for line in lines:
        review = json.loads(line)
        label = review["completion"]
        polite = POLITE[label][3 if held_out else rng.randrange(3)]
        curt = CURT[label][3 if held_out else rng.randrange(3)]
        prompt = f"A customer wrote: {review['prompt']}\nReply to the customer."
        out.append({"prompt": prompt, "chosen": polite, "rejected": curt})
    return out


def main() -> None:
    for split, name, limit in (("train", "train", 400), ("test", "test", 64)):
        text = "".join(json.dumps(r) + "\n" for r in rows(split)[:limit])
        (DATASETS / f"polite-{name}.jsonl").write_text(text)


if __name__ == "__main__":
    main()
