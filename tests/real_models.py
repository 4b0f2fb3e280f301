"""The models the built-in recipes name, as their real config.json and tokenizer_config.json
(tests/data/models/<name>/, SOURCE.md there), built small with random weights.

What changes from the real config, and only this (SHRINK): 2 layers; the widths below
(head_dim, rope, norms, softcaps, windows, activations, tying: all as shipped); vocab_size
down to the stand-in tokenizer's size (rounded up to 64, as padded vocabularies are); the
bos/eos/pad ids moved to where the stand-in tokenizer puts the same tokens; initializer_range
0.15 so random logits are far from uniform. The tokenizer is a stand-in (a byte-level BPE
trained here, mlxlocal.tiny.write_tokenizer) carrying the real special tokens, chat template
and tokenizer_config.json settings; the real vocabularies are the vocabulary issue's.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data" / "models"
# name → the sizes that shrink; head_dim (explicit or hidden/heads) stays the real one.
SHRINK = {
    "Llama-3.2-1B-Instruct": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1),
    "Llama-3.2-3B-Instruct": dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1),
    "Qwen2.5-0.5B-Instruct": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
    "Qwen2.5-1.5B-Instruct": dict(hidden_size=128, num_attention_heads=1, num_key_value_heads=1),
    "Qwen2.5-7B-Instruct": dict(hidden_size=128, num_attention_heads=1, num_key_value_heads=1),
    "Phi-3.5-mini-instruct": dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=2),
    "gemma-2-2b-it": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
    "Mistral-7B-Instruct-v0.3": dict(hidden_size=128, num_attention_heads=1, num_key_value_heads=1),
}
ALWAYS = dict(num_hidden_layers=2, intermediate_size=256, initializer_range=0.15)
MODELS = sorted(SHRINK)
TEMPLATES = sorted(p.name for p in DATA.iterdir() if (p / "tokenizer_config.json").exists())
_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Settings of the real tokenizer class that a fast tokenizer built from tokenizer.json ignores.
_CLASS_ONLY = ("added_tokens_decoder", "tokenizer_class", "sp_model_kwargs", "legacy", "vocab_size")


def real_config(name: str) -> dict:
    return json.loads((DATA / name / "config.json").read_text())


def tokenizer_config(name: str) -> dict:
    return json.loads((DATA / name / "tokenizer_config.json").read_text())


def special_tokens(name: str) -> list[str]:
    """The real special tokens, in the real id order (the stand-in gives them ids 0, 1, …)."""
    decoder = tokenizer_config(name)["added_tokens_decoder"]
    return [decoder[k]["content"] for k in sorted(decoder, key=int)]


def write_stand_in_tokenizer(name: str, out: Path) -> int:
    """The stand-in tokenizer with `name`'s special tokens, template and settings; its size."""
    from mlxlocal.tiny import write_tokenizer

    real = tokenizer_config(name)
    settings = {k: v for k, v in real.items() if k not in _CLASS_ONLY}
    settings |= {k: real.get(k) for k in _TOKEN_KEYS}
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    return write_tokenizer(out, special_tokens=special_tokens(name), **settings)


def _moved_ids(name: str, value):
    """A config's token id (or list) → the stand-in's id of the same token."""
    decoder = tokenizer_config(name)["added_tokens_decoder"]
    specials = special_tokens(name)

    def move(i):
        return None if i is None else specials.index(decoder[str(i)]["content"])

    return [move(i) for i in value] if isinstance(value, list) else move(value)


def small_config(name: str, vocab: int) -> dict:
    config = real_config(name) | SHRINK[name] | ALWAYS
    config["vocab_size"] = -(-vocab // 64) * 64
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            config[key] = _moved_ids(name, config[key])
    return config


def make_real_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """A transformers checkpoint of `name` (small_config, random weights) + stand-in tokenizer."""
    import torch
    import transformers

    out = Path(out)
    vocab = write_stand_in_tokenizer(name, out)
    config = small_config(name, vocab)
    config.pop("auto_map", None)  # phi3 is built into transformers: no remote code
    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name or "bias" in param_name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out
