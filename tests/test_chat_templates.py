"""The real chat templates of the models the built-in recipes name (tests/data/models/*/
tokenizer_config.json, SOURCE.md there) on the model's real vocabulary where it is vendored
(real_models.REAL_VOCAB), else a stand-in tokenizer with the real special tokens:
assistant masks token by token, the end-of-turn stop, system prompts on a template without a
system role, and a template's own refusals as one-line errors."""

from __future__ import annotations

import json

import pytest
from real_models import REAL_VOCAB, TEMPLATES, write_real_tokenizer, write_stand_in_tokenizer

from mlxlocal.data import DataSection, load_examples, render_chat
from mlxlocal.decoding import end_of_turn_ids, stop_ids
from mlxlocal.errors import MlxLocalError
from mlxlocal.models import hf_tokenizer, load_tokenizer

# One of each template (the other sizes of a family ship the same tokenizer_config.json).
NAMES = [
    n
    for n in TEMPLATES
    if n not in ("Llama-3.2-3B-Instruct", "Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct")
]
END_OF_TURN = {  # what each template closes an assistant turn with
    "Llama-3.2-1B-Instruct": ["<|eot_id|>"],
    "Qwen2.5-0.5B-Instruct": ["<|im_end|>"],
    "SmolLM2-1.7B-Instruct": ["<|im_end|>"],
    "gemma-2-2b-it": ["<end_of_turn>"],
    "Mistral-7B-Instruct-v0.3": ["</s>"],
    "Phi-3.5-mini-instruct": ["<|end|>", "<|endoftext|>"],  # EOS closes a conversation too
}
NO_SYSTEM_ROLE = {"gemma-2-2b-it"}  # raises on a system message
# keeps a system message only when a user turn comes last: never in training data
SYSTEM_DROPPED = {"Mistral-7B-Instruct-v0.3"}
STRICT_ALTERNATION = {"gemma-2-2b-it", "Mistral-7B-Instruct-v0.3"}
CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Translate the sentence"},
    {"role": "assistant", "content": "Convert the checkpoint"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    made = {}

    def get(name: str):
        if name not in made:
            out = root / name
            if name in REAL_VOCAB:
                write_real_tokenizer(name, out)
            else:
                write_stand_in_tokenizer(name, out)
            (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
            made[name] = out
        return made[name]

    return get


def expected_weights(hf, messages, tools=None) -> tuple[list[int], list[int]]:
    """The reference, from text: each assistant turn weighs the characters from the end of the
    generation prompt before it to where the rendering through it stops matching the whole
    conversation; a token is weighted when its characters are. Returns (ids, weights)."""

    def text(msgs, prompt=False):
        if not msgs:
            return ""
        return hf.apply_chat_template(
            msgs, tools=tools, tokenize=False, add_generation_prompt=prompt
        )

    full = text(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(text(messages[:i], prompt=True))
        through = text(messages[: i + 1])
        pairs = enumerate(zip(through, full, strict=False))
        end = next((k for k, (a, b) in pairs if a != b), len(through))
        spans.append((start, end))
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    weights = [int(any(s <= a and b <= e for s, e in spans)) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], weights


@pytest.mark.parametrize("name", NAMES)
def test_assistant_turns_are_masked_token_by_token(folder, name):
    tokenizer, hf = load_tokenizer(folder(name)), hf_tokenizer(folder(name))
    ids, weights = expected_weights(hf, CHAT)
    example = render_chat(tokenizer, CHAT)
    assert example.tokens == ids
    assert example.weights == weights
    ends = set(end_of_turn_ids(tokenizer))
    trained = [t for t, w in zip(ids, weights, strict=True) if w]
    assert sum(t in ends for t in trained) >= 2  # each answer learns to end its turn
    assert "Hello there" in hf.decode(trained) and "Convert the checkpoint" in hf.decode(trained)
    assert "Translate" not in hf.decode(trained)


def test_qwen_tools_and_default_system_prompt_stay_unweighted(folder):
    name = "Qwen2.5-0.5B-Instruct"
    tokenizer, hf = load_tokenizer(folder(name)), hf_tokenizer(folder(name))
    plain = hf.apply_chat_template(CHAT, tokenize=False)
    assert plain.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    ids, weights = expected_weights(hf, CHAT, TOOLS)
    assert "get_weather" in hf.decode(ids)
    example = render_chat(tokenizer, CHAT, tools=TOOLS)
    assert (example.tokens, example.weights) == (ids, weights)
    assert "get_weather" not in hf.decode([t for t, w in zip(ids, weights, strict=True) if w])


def test_llama_date_lines_are_rendered_and_unweighted(folder):
    name = "Llama-3.2-1B-Instruct"
    tokenizer, hf = load_tokenizer(folder(name)), hf_tokenizer(folder(name))
    text = hf.apply_chat_template(CHAT, tokenize=False)
    assert "Cutting Knowledge Date: December 2023\nToday Date: " in text
    example = render_chat(tokenizer, CHAT)
    trained = hf.decode([t for t, w in zip(example.tokens, example.weights, strict=True) if w])
    assert "Date" not in trained


@pytest.mark.parametrize("name", NAMES)
def test_the_end_of_turn_stops_generation(folder, name):
    tokenizer = load_tokenizer(folder(name))
    ends = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ends) == END_OF_TURN[name]
    assert set(ends) <= stop_ids(tokenizer)


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("name", NAMES)
def test_a_system_prompt_on_every_template(folder, name, tmp_path):
    """Merged into the first user turn, with a note, where the template refuses or drops a
    system message; given to the template as a system message everywhere else."""
    tokenizer, hf = load_tokenizer(folder(name)), hf_tokenizer(folder(name))
    data = DataSection(
        train=write_rows(tmp_path / "d.jsonl", [{"messages": CHAT}]),
        system_prompt="Answer in French.",
    )
    examples, report = load_examples(data, tokenizer)
    text = hf.decode(examples[0].tokens)
    assert "Answer in French." in text
    with_system = [{"role": "system", "content": "Answer in French."}, *CHAT]
    if name in NO_SYSTEM_ROLE:
        with pytest.raises(Exception, match="System role not supported"):
            hf.apply_chat_template(with_system, tokenize=False)
    if name in SYSTEM_DROPPED:
        assert "French" not in hf.apply_chat_template(with_system, tokenize=False)
    if name in NO_SYSTEM_ROLE | SYSTEM_DROPPED:
        assert "Answer in French.\n\nHi" in text
        assert "merged into the first user turn" in report.summary()
    else:
        assert "merged" not in report.summary()
    example = examples[0]
    trained = hf.decode([t for t, w in zip(example.tokens, example.weights, strict=True) if w])
    assert "French" not in trained


@pytest.mark.parametrize("name", sorted(STRICT_ALTERNATION))
def test_a_template_that_raises_is_one_clear_line(folder, name, tmp_path):
    tokenizer = load_tokenizer(folder(name))
    broken = [CHAT[0], CHAT[2], CHAT[1]]  # two user turns in a row
    data = DataSection(
        train=write_rows(tmp_path / "d.jsonl", [{"messages": CHAT}] + [{"messages": broken}])
    )
    with pytest.raises(MlxLocalError) as e:
        load_examples(data, tokenizer)
    message = str(e.value)
    assert "\n" not in message and "d.jsonl:2" in message
    assert "roles must alternate" in message
    assert "chat template" in message


# A tool round trip as the openai client sends it: the assistant's call with its arguments as a
# JSON string and no content, then the tool's answer.
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
]


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B-Instruct", "Llama-3.2-1B-Instruct"])
def test_serve_tool_messages_render_as_transformers_does(folder, name):
    """serve passes tool calls and tool results to the template as transformers documents them
    (arguments as an object, not a JSON string the template would encode twice)."""
    from mlxlocal.generate import render_chat as render_request
    from mlxlocal.serve.schemas import ChatRequest

    tokenizer, hf = load_tokenizer(folder(name)), hf_tokenizer(folder(name))
    request = ChatRequest.model_validate({"model": "m", "messages": TOOL_TURNS, "tools": TOOLS})
    ids = render_request(tokenizer, [m.for_template() for m in request.messages], request.tools)
    documented = json.loads(json.dumps(TOOL_TURNS))
    documented[1]["content"] = ""
    documented[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    text = hf.apply_chat_template(
        documented, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    shown = hf.decode(ids)
    assert '{"city": "Paris"}' in shown and '\\"city\\"' not in shown
    # (Llama's template writes a string tool result with tojson too: its own choice.)
    assert "sunny" in shown and "get_weather" in shown
