"""Real vocabularies as the reference: llama.cpp's tokenizer fixtures (tests/data/llama_vocab,
see SOURCE.md there), whose `.out` ids the real Hugging Face tokenizers gave.

Both directions, every text: GGUF → our rebuilt HF tokenizer → ids; HF tokenizer → our GGUF
export → llama.cpp's tokenizer → ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest
from real_models import (
    QWEN25_SPECIAL,
    llama3_special_tokens,
    write_llama3_tokenizer,
    write_qwen2_tokenizer,
)

from mlxlocal.checkpoint.gguf import open_gguf
from mlxlocal.checkpoint.gguf_tokenizer import write_tokenizer_files
from mlxlocal.export.gguf_tokenizer import add_tokenizer
from mlxlocal.models import hf_tokenizer

DATA = Path(__file__).parent / "data" / "llama_vocab"
GGUF_FAMILIES = ["llama-spm", "phi-3", "gpt-2"]  # llama.cpp's own vocabulary GGUFs
TIKTOKEN_FAMILIES = ["llama-bpe", "qwen2"]  # rebuilt from the real rank files
FAMILIES = GGUF_FAMILIES + TIKTOKEN_FAMILIES


def cases(family: str) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs as llama.cpp's test-tokenizer-0 reads them."""
    texts = (DATA / f"ggml-vocab-{family}.gguf.inp").read_text(encoding="utf-8")
    texts = texts.split("\n__ggml_vocab_test__\n")[:-1]
    outs = (DATA / f"ggml-vocab-{family}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == 46 and len(outs) >= 46
    return [(t, [int(i) for i in o.split()]) for t, o in zip(texts, outs[:46], strict=True)]


def mismatches(encode, family: str) -> list[tuple[str, list[int], list[int]]]:
    wrong = [(text, ids, encode(text)) for text, ids in cases(family)]
    return [w for w in wrong if w[1] != w[2]]


def _tiktoken_tokenizer(family: str, out: Path) -> Path:
    """The family's HF tokenizer, as transformers' own TikTokenConverter makes it from the
    model's tiktoken ranks (how Llama 3's tokenizer.json was made)."""
    out.mkdir()
    if family == "llama-bpe":
        special = llama3_special_tokens()
        write_llama3_tokenizer(out, special)
        config = {"bos_token": special[0], "eos_token": special[1]}
    else:
        write_qwen2_tokenizer(out, QWEN25_SPECIAL[:3])
        config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        config["add_bos_token"] = False
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    """family → folder with its HF tokenizer: rebuilt by our GGUF import from llama.cpp's
    vocabulary GGUF, or made from the tiktoken ranks by transformers."""
    root = tmp_path_factory.mktemp("vocab")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            if family in GGUF_FAMILIES:
                _, fields = open_gguf(DATA / f"ggml-vocab-{family}.gguf")
                (root / family).mkdir()
                write_tokenizer_files(fields, root / family)
                cache[family] = root / family
            else:
                cache[family] = _tiktoken_tokenizer(family, root / family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def exported(hf_tokenizers, tmp_path_factory):
    """family → the vocabulary-only GGUF our export writes of its HF tokenizer."""
    root = tmp_path_factory.mktemp("exported")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = root / f"{family}.gguf"
            assert vocab_gguf(hf_tokenizers(family), cache[family]) == []
        return cache[family]

    return get


def vocab_gguf(model: Path, path: Path) -> list[str]:
    """A vocabulary-only GGUF (what llama.cpp loads with vocab_only) of `model`'s tokenizer,
    written by our GGUF export's tokenizer writer; its warnings."""
    data = json.loads((model / "tokenizer.json").read_text())
    ids = [*data["model"]["vocab"].values(), *(t["id"] for t in data["added_tokens"])]
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (writer.add_block_count, 1),
        (writer.add_context_length, 4096),
        (writer.add_embedding_length, 64),
        (writer.add_feed_forward_length, 128),
        (writer.add_head_count, 4),
        (writer.add_layer_norm_rms_eps, 1e-5),
    ):
        add(value)
    warnings = add_tokenizer(writer, model, max(ids) + 1, {})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return warnings


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_vocabulary_imports_as_the_real_tokenizer(family, hf_tokenizers):
    """llama.cpp's GGUF → our tokenizer.json → the real HF tokenizer's ids, and back to text."""
    tokenizer = hf_tokenizers(family)
    assert not (tokenizer / "tokenizer.model").exists()
    hf = hf_tokenizer(tokenizer)
    assert mismatches(lambda t: hf.encode(t, add_special_tokens=False), family) == []
    for text, ids in cases(family):
        assert hf.decode(ids) == text
    assert hf.encode("Hello")[:1] == ([1] if family != "gpt-2" else [15496])


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_special_tokens_split_as_in_llama_cpp(family, hf_tokenizers):
    """Text around special tokens (chat turns), with llama.cpp on its own GGUF as the
    reference: the word marker after a special token, Phi-3's tokens that swallow the spaces
    after them (rstrip)."""
    import llama_cpp

    hf = hf_tokenizer(hf_tokenizers(family))
    llm = llama_cpp.Llama(str(DATA / f"ggml-vocab-{family}.gguf"), vocab_only=True, verbose=False)
    messages = [
        {"role": "user", "content": "Hi there,  how are you?"},
        {"role": "assistant", "content": " Fine.\n"},
        {"role": "user", "content": "\nGood"},
    ]
    texts = [f"{hf.bos_token or ''}{hf.eos_token} a{hf.eos_token}b\n  c{hf.eos_token}"]
    if hf.chat_template:
        texts.append(hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert len(texts) == (2 if family == "phi-3" else 1)
    for text in texts:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert hf.encode(text, add_special_tokens=False) == ids


@pytest.mark.parametrize("family", TIKTOKEN_FAMILIES)
def test_tiktoken_vocabulary_through_our_gguf_and_back(family, hf_tokenizers, exported, tmp_path):
    """The reference first (transformers' conversion of the real ranks gives the `.out` ids),
    then that tokenizer → our GGUF → our import → the same ids."""
    reference = hf_tokenizer(hf_tokenizers(family))
    assert mismatches(lambda t: reference.encode(t, add_special_tokens=False), family) == []
    _, fields = open_gguf(exported(family))
    assert fields["tokenizer.ggml.pre"] == family
    (tmp_path / "back").mkdir()
    write_tokenizer_files(fields, tmp_path / "back")
    back = hf_tokenizer(tmp_path / "back")
    assert mismatches(lambda t: back.encode(t, add_special_tokens=False), family) == []
    assert back.encode("Hi")[0] == reference.encode("Hi")[0]  # BOS (Llama 3) or none (Qwen2)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_tokenizes_in_llama_cpp_as_the_real_tokenizer(family, exported):
    """HF tokenizer → our GGUF export → llama.cpp's own tokenizer → the `.out` ids. The
    SentencePiece families have only a tokenizer.json (our import writes no tokenizer.model)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(exported(family)), vocab_only=True, verbose=False)
    spm = family in ("llama-spm", "phi-3")
    assert llm.metadata["tokenizer.ggml.model"] == ("llama" if spm else "gpt2")
    encode = lambda t: llm.tokenize(t.encode(), add_bos=False, special=True)  # noqa: E731
    assert mismatches(encode, family) == []


def test_sentencepiece_scores_come_from_the_merges(exported, tmp_path):
    """What llama.cpp's converter writes for a tokenizer.json without tokenizer.model (score
    -1000 for every piece) is not enough: its SentencePiece tokenizer then merges in the wrong
    order. Ours ranks pieces by merge order."""
    import llama_cpp

    reader = gguf.GGUFReader(exported("llama-spm"))
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    assert len(set(scores)) > 25000
    flat = tmp_path / "flat.gguf"
    writer = gguf.GGUFWriter(str(flat), "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = [-1000.0] * len(scores) if name == "tokenizer.ggml.scores" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    llm = llama_cpp.Llama(str(flat), vocab_only=True, verbose=False)
    encode = lambda t: llm.tokenize(t.encode(), add_bos=False, special=True)  # noqa: E731
    assert len(mismatches(encode, "llama-spm")) >= 10


# The Hub's own files, by the SHA-256 of their LFS objects (in many public manifests; see
# SOURCE.md): meta-llama/Llama-3.1-8B original/tokenizer.model and
# mistralai/Mistral-7B-Instruct-v0.3 tokenizer.model(.v3).
HUB_SHA256 = {
    "llama3-tokenizer.model": "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    "mistral-v0.3-tokenizer.model": (
        "37f00374dea48658ee8f5d0f21895b9bc55cb0103939607c8185bfd1c6ca1f89"
    ),
}


@pytest.mark.parametrize("name", sorted(HUB_SHA256))
def test_vendored_tokenizer_models_are_the_hubs_bytes(name):
    assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == HUB_SHA256[name]
