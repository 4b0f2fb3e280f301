"""The end of a turn ends every answer, unprinted; sampling never picks an id past the vocabulary.

Tokenizers are trained here (mlxlocal.tiny.write_tokenizer) with the special tokens and chat
templates real models ship, copied verbatim from their tokenizer_config.json:
- ChatML: Qwen/Qwen2.5-0.5B-Instruct (SmolLM2 uses the same `<|im_end|>` turns); tokens set as in
  Qwen2.5's base models, whose EOS is `<|endoftext|>`, not the `<|im_end|>` that ends a turn.
- Llama 3: meta-llama/Meta-Llama-3-8B-Instruct as first published (EOS `<|end_of_text|>`, turns
  end with `<|eot_id|>`).
- Phi-3: microsoft/Phi-3.5-mini-instruct (EOS `<|endoftext|>`, turns end with `<|end|>`).
- Gemma 2: google/gemma-2-2b-it's tokenizer_config.json as vendored (EOS `<eos>`, turns end with
  `<end_of_turn>`; the real 256k vocabulary's own test is tests/test_real_models.py, whose
  random Gemma model cannot be rigged).
None of them lists its end-of-turn token as EOS, so the stop must come from the template. Each
tokenizer is put on the tiny test model, whose output layer is then rigged (two rows swapped)
so that greedy decoding produces the end-of-turn token a few tokens in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import PROMPT, rig_end_of_turn

import mlxlocal
from mlxlocal.chat import ChatSession
from mlxlocal.cli import cli
from mlxlocal.data import render_chat
from mlxlocal.decoding import declared_eos_ids, end_of_turn_ids, stop_ids
from mlxlocal.errors import MlxLocalError
from mlxlocal.evaluate import evaluate
from mlxlocal.export.ollama import modelfile
from mlxlocal.generate import Sampling, generate, load_model
from mlxlocal.models import load, load_tokenizer
from mlxlocal.sources import builtin_model
from mlxlocal.tiny import write_tokenizer

QWEN25 = (  # Qwen/Qwen2.5-0.5B-Instruct, tokenizer_config.json
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'sys"
    "tem' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, "
    "created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n"
    "\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou ar"
    'e provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n    {%-'
    ' for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %'
    '}\n    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name'
    ' and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <func'
    'tion-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else '
    "%}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + mess"
    "ages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nY"
    "ou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%"
    '- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == "user"'
    ') or (message.role == "system" and not loop.first) or (message.role == "assistant" and no'
    "t message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.conten"
    "t + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im"
    "_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + messa"
    "ge.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n    "
    "        {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_cal"
    'l.function %}\n            {%- endif %}\n            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n            {{- \'", "arguments": \' }}\n            {{- t'
    "ool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loo"
    'p.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n            {{- \'<|im_star'
    "t|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- messag"
    "e.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loo"
    "p.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assista"
    "nt\\n' }}\n{%- endif %}"
)
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start"
    "_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot"
    "_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ conten"
    "t }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id"
    "|>\n\n' }}{% endif %}"
)
PHI35 = (  # microsoft/Phi-3.5-mini-instruct, tokenizer_config.json
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|"
    "system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user"
    "|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assis"
    "tant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_pro"
    "mpt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GEMMA2 = json.loads(  # google/gemma-2-2b-it (vendored: tests/data/models, see SOURCE.md there)
    (Path(__file__).parent / "data/models/gemma-2-2b-it/tokenizer_config.json").read_text()
)["chat_template"]
# name → (special tokens, tokenizer_config.json settings, the end of a turn as the template has it)
STYLES = {
    "chatml": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        ["<|im_end|>"],
        QWEN25,
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
        + ["<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": None},
        ["<|eot_id|>"],
        LLAMA3,
    ),
    "phi3": (
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>"]
        + ["<|user|>"],
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        ["<|end|>", "<|endoftext|>"],  # the template closes a conversation with EOS too
        PHI35,
    ),
    "gemma2": (
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
        ["<end_of_turn>"],
        GEMMA2,
    ),
}


def set_eos(folder, eos: int) -> None:
    """Point config.json and generation_config.json at the tokenizer's EOS id, as shipped."""
    for name in ("config.json", "generation_config.json"):
        file = folder / name
        config = json.loads(file.read_text()) if file.exists() else {}
        config.update(bos_token_id=None, eos_token_id=eos, pad_token_id=None)
        file.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def styled(tiny_mlx, tmp_path_factory):
    """style → (the tiny model with that style's tokenizer and template, rigged to end a turn,
    the prompt it was rigged for)."""
    root = tmp_path_factory.mktemp("styles")
    made = {}

    def get(style: str) -> tuple[Path, str]:
        if style not in made:
            specials, config, end, template = STYLES[style]
            folder = root / style
            shutil.copytree(tiny_mlx, folder)
            write_tokenizer(folder, special_tokens=specials, chat_template=template, **config)
            set_eos(folder, specials.index(config["eos_token"]))
            made[style] = folder, rig_end_of_turn(folder, specials.index(end[0]))
        return made[style]

    return get


@pytest.fixture(scope="module")
def tiny_styled(tiny_mlx, tmp_path_factory) -> tuple[Path, str]:
    """The tiny test model (mlxlocal's own template and tokens; EOS `</s>` only), rigged."""
    folder = tmp_path_factory.mktemp("tiny-style") / "tiny"
    shutil.copytree(tiny_mlx, folder)
    assert 3 not in declared_eos_ids(folder)  # `<|end|>`: the template must say it
    return folder, rig_end_of_turn(folder, 3)


@dataclass
class Case:
    folder: Path
    prompt: str
    ends: list[str]  # the end-of-turn token strings
    tokens: list[int]  # the reference: greedy tokens through the first end-of-turn token
    text: str  # the text of the tokens before that one


@pytest.fixture(params=[*STYLES, "tiny"])
def case(request, styled, tiny_styled) -> Case:
    """Each template style's rigged model, with the reference its answers must equal: greedy
    tokens past every stop (ignore_eos), cut after the first end-of-turn token."""
    if request.param == "tiny":
        (folder, prompt), ends = tiny_styled, ["<|end|>"]
    else:
        (folder, prompt), ends = styled(request.param), STYLES[request.param][2]
    lm = load_model(folder)
    tokens = generate(lm, prompt, max_tokens=12, ignore_eos=True).tokens
    first = next(i for i, t in enumerate(tokens) if t in end_of_turn_ids(lm.tokenizer))
    text = generate(lm, prompt, max_tokens=first, ignore_eos=True).text  # as it is shown
    return Case(folder, prompt, ends, tokens[: first + 1], text)


@pytest.mark.parametrize("style", STYLES)
def test_end_of_turn_found_by_rendering_each_template(styled, style):
    tokenizer = load_tokenizer(styled(style)[0])
    ends = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ends) == STYLES[style][2]
    assert set(ends) <= stop_ids(tokenizer)
    assert tokenizer.eos_token_id in stop_ids(tokenizer)


def test_generate_stops_at_the_end_of_turn_and_never_shows_it(case):
    result = generate(load_model(case.folder), case.prompt, max_tokens=12)
    assert result.tokens == case.tokens and result.finish_reason == "stop"
    assert result.text == case.text and not any(e in result.text for e in case.ends)

    args = ["generate", str(case.folder), "-p", case.prompt, "--max-tokens", "12"]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    assert out.stdout == case.text + "\n"


def test_chat_stops_at_the_end_of_turn_and_never_shows_it(case):
    session = ChatSession(load_model(case.folder), max_tokens=12)
    answer = session.send(case.prompt)
    assert "".join(answer) == case.text and answer.result.tokens == case.tokens
    assert session.messages[-1] == {"role": "assistant", "content": case.text}

    args = ["chat", str(case.folder), "--max-tokens", "12"]
    out = CliRunner().invoke(cli, args, input=case.prompt + "\n")
    assert out.exit_code == 0, out.output
    assert out.stdout == case.text + "\n"


def test_batch_stops_at_the_end_of_turn_and_never_writes_it(case, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": case.prompt}) + "\n")
    mlxlocal.batch(case.folder, tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_tokens=12)
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["output"] == case.text and record["finish_reason"] == "stop"
    assert record["generated_tokens"] == len(case.tokens)


def test_eval_generate_stops_at_the_end_of_turn(case, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": case.prompt, "completion": case.text}) + "\n")
    result = evaluate(case.folder, data, "generate", max_tokens=12)
    assert result.examples[0]["answer"] == case.text.strip()
    assert result.metrics["exact_match"] == 1.0


def test_training_masks_cover_the_same_end_of_turn(case):
    """Training teaches the model to end its turns with the tokens that stop generation."""
    tokenizer = load_tokenizer(case.folder)
    ends = end_of_turn_ids(tokenizer)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    example = render_chat(tokenizer, messages)
    spans, span = [], []
    for token, weight in zip(example.tokens, example.weights, strict=True):
        if weight:
            span.append(token)
        elif span:
            spans, span = [*spans, span], []
    spans += [span] if span else []
    assert len(spans) == 2
    for answer, span in zip(["Hello there", "Goodbye"], spans, strict=True):
        assert tokenizer.decode(span).startswith(answer)
        assert ends[0] in span  # each answer's weighted tokens include its end of turn
    last = spans[-1]
    assert [t for t in last if t in ends] == ends


def test_the_builtin_model_declares_its_end_of_turn():
    _, tokenizer = load(builtin_model("tiny"))
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in declared_eos_ids(builtin_model("tiny"))
    assert end in tokenizer.eos_token_ids  # so mlx-lm's own generate stops there too


def test_checkpoint_eos_lists_join_the_stop_set(styled, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(styled("llama3")[0], folder)
    tokenizer = load_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    assert {1, 7} <= stop_ids(tokenizer, folder)
    for bad in ('{"eos_token_id": "x"}', '{"eos_token_id": [1, true]}', "{nope"):
        (folder / "generation_config.json").write_text(bad)
        with pytest.raises(MlxLocalError, match="generation_config.json"):
            stop_ids(tokenizer, folder)


def test_a_template_that_closes_a_last_answer_with_nothing(styled, tmp_path):
    """Qwen1.5-Chat ends an answer with `<|im_end|>` only when another message follows."""
    folder = tmp_path / "qwen15"
    shutil.copytree(styled("chatml")[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (  # Qwen/Qwen1.5-1.8B-Chat, tokenizer_config.json
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}{% if (loop.last and "
        "add_generation_prompt) or not loop.last %}{{ '<|im_end|>' + '\\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) == ["<|im_end|>"]


def test_the_ollama_modelfile_stops_where_generate_does(styled):
    folder, _ = styled("llama3")
    text = modelfile(folder, "./model.gguf")
    stops = {line.split('"')[1] for line in text.splitlines() if line.startswith("PARAMETER stop")}
    assert stops == {"<|eot_id|>", "<|end_of_text|>"}


# --- ids past the tokenizer's vocabulary ------------------------------------------------------


@pytest.fixture(scope="module")
def padded(mlx_checkpoints, tmp_path_factory):
    """A model with 64 embedding rows past its tokenizer, rigged to prefer them (as a padded
    vocabulary's untrained rows can be): (folder, tokenizer size)."""
    folder = tmp_path_factory.mktemp("padded") / "model"
    shutil.copytree(mlx_checkpoints("llama", vocab_size=576), folder)
    size = len(load_tokenizer(folder).get_vocab())
    file = folder / "model.safetensors"
    weights = mx.load(str(file))
    head = np.array(weights["lm_head.weight"])
    assert head.shape[0] == size + 64
    first = generate(load_model(folder), PROMPT, max_tokens=1, ignore_eos=True).tokens[0]
    head[size:] = 3 * head[first]
    weights["lm_head.weight"] = mx.array(head)
    mx.save_safetensors(str(file), weights, metadata={"format": "mlx"})
    return folder, size


def greedy_within(lm, ids: list[int], size: int, n: int) -> tuple[list[int], bool]:
    """Greedy tokens over the first `size` logits, by hand; and whether the full argmax ever
    fell past them (the trap is live)."""
    out, past = [], False
    for _ in range(n):
        logits = np.array(lm.model(mx.array([ids + out]))[0, -1].astype(mx.float32))
        past |= int(logits.argmax()) >= size
        out.append(int(logits[:size].argmax()))
    return out, past


def test_generation_never_picks_an_id_the_tokenizer_cannot_decode(padded, tmp_path):
    folder, size = padded
    lm = load_model(folder)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    expected, past = greedy_within(lm, ids, size, 8)
    assert past
    assert generate(lm, PROMPT, max_tokens=8, ignore_eos=True).tokens == expected

    (tmp_path / "in.jsonl").write_text(json.dumps({"text": PROMPT}) + "\n")
    mlxlocal.batch(lm, tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_tokens=8, ignore_eos=True)
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["output"] == lm.tokenizer.decode(expected)

    sampling = Sampling(temp=2.0, seed=1)
    sampled = generate(lm, PROMPT, max_tokens=48, ignore_eos=True, sampling=sampling).tokens
    assert max(sampled) < size


def test_a_filled_vocabulary_decodes_every_id(tmp_path):
    """`fill_vocab` (the serve benchmark's model): every embedding row is a token, so nothing
    is masked and a generated token's text tokenizes back to that token."""
    from mlxlocal.decoding import decodable_only
    from mlxlocal.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path / "plain", vocab=640)
    build_tiny_checkpoint(tmp_path / "filled", vocab=640, fill_vocab=True)
    plain, filled = load_tokenizer(tmp_path / "plain"), load_tokenizer(tmp_path / "filled")
    assert len(plain.get_vocab()) < 640 == len(filled.get_vocab())
    assert decodable_only(plain, 640) is not None and decodable_only(filled, 640) is None
    assert filled.encode(plain.decode([5, 200]), add_special_tokens=False) == [5, 200]
    assert filled.encode(filled.decode([600, 639]), add_special_tokens=False) == [600, 639]
