"""A tiny Llama-shaped Hugging Face checkpoint built locally and deterministically.

It stands in for a downloaded model in the quickstart, the benchmarks and the tests: same files,
same config style (transformers 5), random weights. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CORPUS = """\
The quick brown fox jumps over the lazy dog.
A local model keeps your data on your own machine.
Convert the checkpoint, quantize it, then talk to it.
Fine-tuning teaches a small model one job done well.
The weather today is sunny with a light breeze from the sea.
I loved this film: the acting was great and the story moving.
This product broke after two days and support never answered.
Translate the sentence into French, then into German.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.
Questions and answers, prompts and completions, system and user and assistant.
"""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def write_tokenizer(
    out: Path,
    vocab_size: int = 512,
    corpus: str = CORPUS,
    context: int = 512,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    fill_to: int | None = None,
    **config: Any,
) -> int:
    """Train a byte-level BPE tokenizer on `corpus`, write HF tokenizer files; return its size.

    The special tokens take the first ids, in order; `config` overrides tokenizer_config.json
    (its tokens, chat template...), so tests can build the tokenizers of other model families.
    `fill_to` adds plain tokens `<unused0>`, `<unused1>`... up to that size (as Gemma reserves
    its unused ids), so that every id of a wider embedding decodes to text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer)
    if fill_to is not None:
        tok.add_tokens([f"<unused{i}>" for i in range(fill_to - tok.get_vocab_size())])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": context,
        **config,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def build_tiny_checkpoint(
    out: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    vocab: int | None = None,
    dtype: str = "float32",
    shard_bytes: int | None = None,
    seed: int = 0,
    rope_theta: float = 50000.0,
    head_dim: int = 16,
    context: int = 512,
    fill_vocab: bool = False,
) -> Path:
    """Write a random-weight Llama checkpoint (config, safetensors, tokenizer) to `out`.

    `vocab` pads the embedding beyond the trained tokenizer (for realistic sizes), with tokens
    for the padded ids too when `fill_vocab` (else they decode to nothing, as in some real
    checkpoints whose embedding is rounded up). `shard_bytes` splits the weights into shards
    with an index, as the Hub does. Tests keep the small default `head_dim`; benchmarks pass
    64, as in Llama 3.2 1B and Qwen2.5.
    """
    out = Path(out)
    trained = write_tokenizer(out, context=context)
    vocab = -(-max(vocab or 0, trained) // 64) * 64
    if fill_vocab and vocab > trained:
        write_tokenizer(out, context=context, fill_to=vocab)
    heads = max(hidden // head_dim, 1)
    kv_heads, inter = max(heads // 2, 1), hidden * 2
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.15).astype(dtype)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": np.ones(hidden, dtype),
            p + "post_attention_layernorm.weight": np.ones(hidden, dtype),
        }
    tensors["model.norm.weight"] = np.ones(hidden, dtype)
    tensors["lm_head.weight"] = rand(vocab, hidden)
    _save_shards(tensors, out, shard_bytes)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # As instruct models ship it: a turn ends with `<|end|>` as well as with EOS.
    eos = [SPECIAL_TOKENS.index("</s>"), SPECIAL_TOKENS.index("<|end|>")]
    generation = {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def _save_shards(tensors: dict[str, np.ndarray], out: Path, shard_bytes: int | None) -> None:
    from safetensors.numpy import save_file

    groups: list[dict[str, np.ndarray]] = [{}]
    for name, t in tensors.items():
        if shard_bytes and groups[-1] and sum(a.nbytes for a in groups[-1].values()) > shard_bytes:
            groups.append({})
        groups[-1][name] = t
    if len(groups) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
