"""`generate`: greedy parity with transformers, sampling, stop strings, context, the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

import mlxlocal
from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.generate import Sampling, find_stop, generate, load_model, stream

PROMPT = "The quick brown fox"


def probe(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 512, n).tolist()


def test_greedy_matches_transformers_for_48_tokens(checkpoints, tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM

    ids = probe(12)
    hf = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), dtype=torch.float32).eval()
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id = None  # no EOS stopping on either side: compare all 48 tokens
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), generation_config=config, max_new_tokens=48, do_sample=False
        )
    expected = out[0, len(ids) :].tolist()
    result = generate(tiny_lm, ids, max_tokens=48, ignore_eos=True)
    assert len(expected) == 48
    assert result.tokens == expected
    assert result.finish_reason == "length"


def test_greedy_through_the_chat_template_matches_transformers(checkpoints, tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoints("llama")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    ids = AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), generation_config=config, max_new_tokens=32, do_sample=False
        )
    s = stream(tiny_lm, PROMPT, system="Be brief.", max_tokens=32, ignore_eos=True)
    assert s.ids == list(ids)
    "".join(s)
    assert s.result.tokens == out[0, len(ids) :].tolist()


def test_temperature_zero_and_top_k_one_are_greedy(tiny_lm):
    def tokens(**sampling):
        opts = dict(max_tokens=24, ignore_eos=True, sampling=Sampling(**sampling))
        return generate(tiny_lm, PROMPT, **opts).tokens

    greedy = tokens()  # the default, checked against transformers above
    assert tokens(temp=0.0, top_p=0.3, min_p=0.2, seed=5) == greedy
    assert tokens(temp=1.5, top_k=1, seed=5) == greedy
    assert tokens(temp=1.5, seed=5) != greedy


def test_same_seed_same_text(tiny_lm):
    def sample(seed):
        opts = dict(max_tokens=32, ignore_eos=True, sampling=Sampling(temp=1.0, seed=seed))
        return generate(tiny_lm, PROMPT, **opts).tokens

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    assert sample(3) != generate(tiny_lm, PROMPT, max_tokens=32, ignore_eos=True).tokens


def test_stop_string_spanning_several_tokens_is_cut_exactly(tiny_lm):
    base = stream(tiny_lm, PROMPT, max_tokens=40, ignore_eos=True)
    pieces = list(base)
    full = base.result.text
    # A stop string from the end of one streamed piece through the start of the third.
    i = next(i for i in range(len(pieces) - 2) if len(pieces[i]) > 1 and pieces[i + 2])
    stop = pieces[i][-1] + pieces[i + 1] + pieces[i + 2][0]
    expected = full[: full.find(stop)]

    s = stream(tiny_lm, PROMPT, max_tokens=40, ignore_eos=True, stop=["never there", stop])
    shown = "".join(s)
    assert shown == expected == s.result.text
    assert s.result.finish_reason == "stop"
    assert len(s.result.tokens) < 40

    out = CliRunner().invoke(
        cli,
        [
            "generate",
            str(tiny_lm.path),
            "-p",
            PROMPT,
            "--stop",
            stop,
            "--max-tokens",
            "40",
            "--ignore-eos",
        ],
    )
    assert out.exit_code == 0, out.output
    assert out.stdout == expected + "\n"


def test_find_stop_holds_back_a_possible_start():
    assert find_stop("say ab", ["abx"], 0) == (4, False)  # "ab" may grow into "abx"
    assert find_stop("say ab", ["abx"], 0, final=True) == (6, False)
    assert find_stop("say abc", ["abx"], 0) == (7, False)
    assert find_stop("say abx!", ["abx", "y"], 0) == (2, True)
    assert find_stop("hello", [], 0) == (5, False)


def test_eos_ends_the_answer_unless_ignored(tiny_mlx):
    lm = load_model(tiny_mlx)  # its own copy: the EOS set is changed below
    greedy = generate(lm, PROMPT, max_tokens=16, ignore_eos=True)
    eos = greedy.tokens[5]
    lm.tokenizer.add_eos_token(str(eos))
    stopped = generate(lm, PROMPT, max_tokens=16)
    first = greedy.tokens.index(eos)
    assert stopped.tokens == greedy.tokens[: first + 1]
    assert stopped.finish_reason == "stop"
    assert stopped.text == lm.tokenizer.decode(greedy.tokens[:first])
    assert generate(lm, PROMPT, max_tokens=16, ignore_eos=True).tokens == greedy.tokens


def test_chat_template_is_applied_by_default(tiny_lm):
    assistant = tiny_lm.tokenizer.convert_tokens_to_ids("<|assistant|>")
    templated = stream(tiny_lm, PROMPT, max_tokens=1)
    plain = stream(tiny_lm, PROMPT, max_tokens=1, chat_template=False)
    assert assistant in templated.ids and assistant not in plain.ids
    assert plain.ids == tiny_lm.tokenizer.encode(PROMPT)
    with pytest.raises(MlxLocalError, match="chat template"):
        stream(tiny_lm, PROMPT, system="Be brief.", chat_template=False)


def test_prompt_longer_than_the_context(tiny_lm):
    context = tiny_lm.context
    assert context == 256
    long = probe(context + 40)
    with pytest.raises(MlxLocalError, match="--truncate"):
        stream(tiny_lm, long)
    cut = generate(tiny_lm, long, max_tokens=8, truncate=True, ignore_eos=True)
    assert cut.prompt_tokens == context - 8
    assert (
        cut.tokens
        == generate(tiny_lm, long[-(context - 8) :], max_tokens=8, ignore_eos=True).tokens
    )
    assert "truncated" in cut.warnings[0]
    # A prompt that fits leaves the answer what is left of the context.
    capped = generate(tiny_lm, probe(context - 5), max_tokens=50, ignore_eos=True)
    assert capped.generation_tokens == 5 and "capped" in capped.warnings[0]


def test_bad_sampling_values_are_user_errors():
    for bad in (
        dict(temp=-1),
        dict(top_p=0),
        dict(top_k=-2),
        dict(min_p=1),
        dict(repetition_penalty=0),
    ):
        with pytest.raises(MlxLocalError):
            Sampling(**bad)


def test_python_api_takes_a_path(tiny_mlx, tiny_lm):
    by_path = mlxlocal.generate(tiny_mlx, PROMPT, max_tokens=8)
    assert by_path.tokens == mlxlocal.generate(tiny_lm, PROMPT, max_tokens=8).tokens
    assert "".join(mlxlocal.stream(tiny_mlx, PROMPT, max_tokens=8)) == by_path.text


def test_cli_streams_text_and_summarises_on_stderr(tiny_lm):
    expected = generate(tiny_lm, PROMPT, max_tokens=12)
    out = CliRunner().invoke(
        cli, ["generate", str(tiny_lm.path), "-p", PROMPT, "--max-tokens", "12"]
    )
    assert out.exit_code == 0, out.output
    assert out.stdout == expected.text + "\n"
    summary = out.stderr.strip().splitlines()[-1]
    assert f"prompt: {expected.prompt_tokens} tokens" in summary
    assert f"generated: {expected.generation_tokens} tokens" in summary
    assert "tok/s" in summary and "peak memory" in summary

    out = CliRunner().invoke(
        cli,
        ["generate", str(tiny_lm.path), "-p", "-", "--max-tokens", "12", "--json"],
        input=PROMPT + "\n",
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["text"] == expected.text
    assert data["generation_tokens"] == expected.generation_tokens
    assert data["finish_reason"] == expected.finish_reason
    assert data["peak_memory_gb"] > 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "{missing}", "-p", "hi"], "no such model folder"),
        (["generate", "{model}"], "give a prompt"),
        (["generate", "{model}", "-p", "word " * 400, "--no-chat-template"], "--truncate"),
        (["generate", "{model}", "-p", "hi", "--top-p", "0"], "--top-p"),
    ],
)
def test_cli_user_errors(tiny_mlx, tmp_path, args, needle):
    args = [a.format(model=tiny_mlx, missing=tmp_path / "nope") for a in args]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 1
    assert out.stderr.startswith("error:") and needle in out.stderr
    assert "Traceback" not in out.output


def test_adapter_is_applied(tiny_mlx, tiny_lm, tmp_path):
    import mlx.core as mx

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    keys = ["self_attn.q_proj", "self_attn.v_proj"]
    config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": keys},
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    weights = {}
    for i in range(2):
        for key, out_dim in zip(keys, (64, 32), strict=True):
            name = f"model.layers.{i}.{key}"
            weights[f"{name}.lora_a"] = mx.array(rng.normal(0, 0.3, (64, 4)).astype(np.float32))
            weights[f"{name}.lora_b"] = mx.array(
                rng.normal(0, 0.3, (4, out_dim)).astype(np.float32)
            )
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)

    tuned = generate(load_model(tiny_mlx, adapter), PROMPT, max_tokens=12, ignore_eos=True)
    assert tuned.tokens != generate(tiny_lm, PROMPT, max_tokens=12, ignore_eos=True).tokens
    args = ["generate", str(tiny_mlx), "-p", PROMPT, "--max-tokens", "12", "--ignore-eos"]
    out = CliRunner().invoke(cli, [*args, "--adapter", str(adapter)])
    assert out.exit_code == 0, out.output
    assert out.stdout == tuned.text + "\n"
