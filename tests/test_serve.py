"""`serve`: a live server on a loopback port, driven by the official `openai` client.

Every greedy answer is compared with `generate` on the same input (the same model loaded alone,
with the same adapter); concurrency, cancellation, capacity and bad requests are checked against
what the server must still answer correctly afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from click.testing import CliRunner
from helpers import make_adapter, mlx_logits
from serving import LiveServer, http
from serving import loopback_only as no_network  # noqa: F401 - replaces conftest's fixture

from mlxlocal.adapters.files import read_adapter
from mlxlocal.adapters.peft import write_peft
from mlxlocal.cli import cli
from mlxlocal.generate import encode_prompt, generate, load_model
from mlxlocal.serve import check_host, create_app

WORDS = "the quick brown fox jumps over a lazy dog and your local model keeps data".split()


def prompts(n: int, seed: int = 0, longest: int = 30) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, k)) for k in rng.integers(1, longest, n)]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_mlx, tmp_path_factory):
    """Three adapters for the tiny model: ours/mlx-lm's LoRA, DoRA, and a PEFT folder."""
    root = tmp_path_factory.mktemp("serve-adapters")
    lora = make_adapter(tiny_mlx, root / "lora")
    dora = make_adapter(tiny_mlx, root / "dora", kind="dora")
    (root / "peft").mkdir()
    write_peft(read_adapter(make_adapter(tiny_mlx, root / "lora2", scale=1.0)), root / "peft")
    return {"lora": lora, "dora": dora, "peft": root / "peft"}


@pytest.fixture(scope="module")
def live(tiny_lm, adapter_dirs):
    """The server as `mlxlocal serve` runs it: with a prefix cache, so repeated and extended
    prompts below start from cached KV states, and must answer exactly as without."""
    app = create_app(tiny_lm, adapter_dirs, max_concurrency=16, prefix_cache=64 * 2**20)
    with LiveServer(app) as server:
        yield server


def chat(client, text, model=None, **options):
    return client.chat.completions.create(
        model=model or client.base_model,
        messages=[{"role": "user", "content": text}],
        temperature=0,
        **options,
    )


@pytest.fixture(scope="module")
def client(live, tiny_mlx):
    c = live.client()
    c.base_model = tiny_mlx.name
    return c


def test_models_list_and_health(live, client, tiny_mlx):
    assert [m.id for m in client.models.list()] == [tiny_mlx.name, "lora", "dora", "peft"]
    assert client.models.retrieve("dora").id == "dora"
    status, health = http("GET", f"{live.url}/health")
    assert status == 200 and health["status"] == "ok" and health["load"] == 0


def test_chat_equals_generate_stream_and_not(client, tiny_lm):
    reasons = set()
    for i, text in enumerate(prompts(6)):
        # Half the answers end on a stop string (a piece of the answer without one), half not.
        whole = generate(tiny_lm, text, max_tokens=14).text
        stop = [whole[4:6]] if i % 2 else []
        ref = generate(tiny_lm, text, max_tokens=14, stop=stop)
        r = chat(client, text, max_tokens=14, stop=stop)
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == len(encode_prompt(tiny_lm.tokenizer, text))
        assert r.usage.completion_tokens == ref.generation_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(
            chat(
                client,
                text,
                max_tokens=14,
                stop=stop,
                stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.tokens)
        pieces = [c.choices[0].delta.content or "" for c in chunks[:-1]]
        assert "".join(pieces) == ref.text
        assert chunks[-2].choices[0].finish_reason == ref.finish_reason
        assert all(c.usage is None for c in chunks[:-1])
        reasons.add(ref.finish_reason)
    assert reasons == {"stop", "length"}


def test_system_and_multi_turn_messages_go_through_the_template(client, tiny_lm):
    from mlxlocal.generate import Stream, render_chat

    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the fox"},
        {"role": "assistant", "content": "a dog"},
        {"role": "user", "content": [{"type": "text", "text": "and the "}, {"type": "text",
                                                                            "text": "data"}]},
    ]  # fmt: skip
    flat = [*messages[:3], {"role": "user", "content": "and the data"}]
    ids = render_chat(tiny_lm.tokenizer, flat)
    ref = Stream(tiny_lm, ids, max_tokens=10)
    expected = "".join(ref)
    r = client.chat.completions.create(
        model=client.base_model, messages=messages, max_completion_tokens=10, temperature=0
    )
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].finish_reason == "length"


def test_completions_equal_generate_without_template(client, tiny_lm):
    for text in prompts(3, seed=4):
        ref = generate(tiny_lm, text, max_tokens=9, chat_template=False)
        r = client.completions.create(
            model=client.base_model, prompt=text, max_tokens=9, temperature=0
        )
        assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.completion_tokens == ref.generation_tokens
        stream = client.completions.create(
            model=client.base_model, prompt=text, max_tokens=9, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == ref.text
    ids = encode_prompt(tiny_lm.tokenizer, "the fox", chat_template=False)
    by_ids = client.completions.create(
        model=client.base_model, prompt=ids, max_tokens=5, temperature=0
    )
    assert by_ids.choices[0].text == generate(tiny_lm, ids, max_tokens=5).text


def test_each_adapter_equals_generate_with_it(client, tiny_mlx, adapter_dirs):
    texts = prompts(2, seed=7)
    answers = {}
    for name, folder in adapter_dirs.items():
        lm = load_model(tiny_mlx, folder)
        for text in texts:
            ref = generate(lm, text, max_tokens=10)
            got = chat(client, text, model=name, max_tokens=10).choices[0].message.content
            assert got == ref.text, name
            answers[name, text] = got
    # The adapters change the answer, and the base stayed the base.
    assert len({answers[n, texts[0]] for n in adapter_dirs}) == 3
    base = chat(client, texts[0], max_tokens=10).choices[0].message.content
    assert base == generate(load_model(tiny_mlx), texts[0], max_tokens=10).text
    assert base not in {answers[n, texts[0]] for n in adapter_dirs}


def test_cli_generate_with_adapter_equals_the_server(client, tiny_mlx, adapter_dirs):
    result = CliRunner().invoke(
        cli,
        ["generate", str(tiny_mlx), "-p", "the lazy dog", "--adapter",
         str(adapter_dirs["peft"]), "--max-tokens", "8", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout.strip().splitlines()[-1])["text"]
    got = chat(client, "the lazy dog", model="peft", max_tokens=8).choices[0].message.content
    assert got == expected


def test_sixteen_concurrent_streams_each_get_their_own_answer(client, tiny_mlx, adapter_dirs):
    """Sequences join and leave one shared loop (two adapters and the base at once)."""
    models = [client.base_model, "lora", "dora"]
    lms = {client.base_model: load_model(tiny_mlx)}
    lms |= {m: load_model(tiny_mlx, adapter_dirs[m]) for m in models[1:]}
    texts = prompts(16, seed=11)
    jobs = [(t, models[i % 3], 4 + 3 * (i % 5)) for i, t in enumerate(texts)]
    expected = [generate(lms[m], t, max_tokens=n).text for t, m, n in jobs]

    def run(job):
        text, model, n = job
        stream = chat(client, text, model=model, max_tokens=n, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, jobs))
    assert got == expected


def test_logprobs_match_the_models_distribution(client, tiny_lm):
    text = "the quick brown fox"
    r = chat(client, text, max_tokens=3, logprobs=True, top_logprobs=3)
    first = r.choices[0].logprobs.content[0]
    ids = encode_prompt(tiny_lm.tokenizer, text)
    logits = mlx_logits(tiny_lm.model, ids)[-1].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    best = np.argsort(-logp)[:3]
    assert first.logprob == pytest.approx(logp[best[0]], abs=1e-4)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(logp[best], abs=1e-4)
    assert [t.token for t in first.top_logprobs] == [tiny_lm.tokenizer.decode([i]) for i in best]
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens == 3
    plain = client.completions.create(
        model=client.base_model, prompt=text, max_tokens=2, temperature=0, logprobs=2
    )
    assert len(plain.choices[0].logprobs.tokens) == 2
    assert len(plain.choices[0].logprobs.top_logprobs[0]) == 2


def test_sampling_with_a_seed_repeats_and_differs_from_greedy(client):
    def sample(seed):
        r = client.chat.completions.create(
            model=client.base_model, messages=[{"role": "user", "content": "the fox"}],
            max_tokens=12, temperature=1.0, seed=seed, extra_body={"top_k": 50},
        )  # fmt: skip
        return r.choices[0].message.content

    with ThreadPoolExecutor(3) as pool:  # neighbours in the batch do not change a seeded draw
        a, b, c = pool.map(sample, [5, 5, 6])
    assert a == b and a != c
    assert a != chat(client, "the fox", max_tokens=12).choices[0].message.content


# --- bad requests ---------------------------------------------------------------------------

BAD = [
    # (method, path, body (bytes, or JSON-able), expected status, expected param or None)
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b"", 400, None),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400, None),
    ("POST", "/v1/chat/completions", [1, 2], 422, None),
    ("POST", "/v1/chat/completions", {"messages": []}, 422, "model"),
    ("POST", "/v1/chat/completions", {"model": "BASE", "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "BASE", "messages": "hi"}, 422, "messages"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "messages": [{"role": "wizard", "content": "x"}]},
        422,
        "messages.0.role",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "messages": [{"content": "x"}]},
        422,
        "messages.0.role",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "max_tokens": "many", "messages": [{"role": "user", "content": "x"}]},
        422,
        "max_tokens",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
        422,
        "max_tokens",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "max_tokens": 100000, "messages": [{"role": "user", "content": "x"}]},
        400,
        "max_tokens",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "temperature": -1, "messages": [{"role": "user", "content": "x"}]},
        422,
        "temperature",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "top_p": 0, "messages": [{"role": "user", "content": "x"}]},
        422,
        "top_p",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "n": 3, "messages": [{"role": "user", "content": "x"}]},
        400,
        "n",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "stop": 5, "messages": [{"role": "user", "content": "x"}]},
        422,
        None,
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "BASE",
            "top_logprobs": 99,
            "logprobs": True,
            "messages": [{"role": "user", "content": "x"}],
        },
        422,
        "top_logprobs",
    ),  # fmt: skip
    (
        "POST",
        "/v1/chat/completions",
        {"model": "BASE", "messages": [{"role": "user", "content": "x " * 400}]},
        400,
        None,
    ),  # fmt: skip  (beyond the 256-token context)
    ("POST", "/v1/completions", {"model": "BASE", "prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "BASE", "prompt": [99999]}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "BASE", "prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "BASE", "prompt": {"a": 1}}, 422, "prompt"),
    ("POST", "/v1/completions", {"model": "BASE", "prompt": "x", "seed": -1}, 422, "seed"),
    (
        "POST",
        "/v1/completions",
        b'{"model": "BASE", "prompt": "x", "max_tokens": NaN}',
        422,
        "max_tokens",
    ),
    ("GET", "/v1/nothing", None, 404, None),
    ("GET", "/v1/models/nope", None, 404, "model"),
    ("DELETE", "/v1/models", None, 405, None),
    ("GET", "/v1/chat/completions", None, 405, None),
]


def test_bad_requests_get_error_objects_and_the_server_still_answers(live, client, tiny_lm):
    base = client.base_model
    for method, path, body, status, param in BAD:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).replace('"BASE"', json.dumps(base)).encode()
        elif isinstance(body, bytes):
            body = body.replace(b'"BASE"', json.dumps(base).encode())
        got, answer = http(method, live.url + path, body, {"Content-Type": "application/json"})
        case = f"{method} {path} {body[:80] if body else body!r}"
        assert got == status, (case, answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"}, case
        assert error["message"] and error["type"], case
        assert "Traceback" not in error["message"], case
        if param is not None:
            assert error["param"] == param, (case, error)
    # An oversized body is refused from its Content-Length, before it is read.
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", live.port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(9 * 1024 * 1024))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    # A template that raises: the model's own template, fed a role it refuses, is a 400.
    with pytest.raises(openai.BadRequestError, match="chat template"):
        tokenizer = tiny_lm.tokenizer
        saved = tokenizer.chat_template
        tokenizer.chat_template = "{{ raise_exception('no tools here') }}"
        try:
            chat(client, "the fox", max_tokens=2)
        finally:
            tokenizer.chat_template = saved
    text = "the lazy dog"
    assert chat(client, text, max_tokens=8).choices[0].message.content == (
        generate(tiny_lm, text, max_tokens=8).text
    )


# --- capacity, cancellation, access log -------------------------------------------------------


@pytest.fixture(scope="module")
def long_context_lm(mlx_checkpoints):
    """A tiny model with a long context, so one answer can run long enough to be interrupted,
    and an embedding wider than its tokenizer (ids 512-575 cannot be decoded)."""
    return load_model(mlx_checkpoints("llama", max_position_embeddings=8192, vocab_size=576))


@pytest.fixture(scope="module")
def endless_lm(long_context_lm):
    """That model with no stop ids: an answer runs to max_tokens unless it is cancelled."""
    lm = load_model(long_context_lm.path)
    lm.__dict__["stop_ids"] = frozenset()  # over the cached property, for this instance only
    return lm


def test_undecodable_ids_are_never_picked_nor_listed(long_context_lm):
    lm, model = long_context_lm, long_context_lm.path.name
    assert lm.decodable_only is not None
    texts = prompts(6, seed=5)
    expected = [generate(lm, t, max_tokens=12).text for t in texts]
    with LiveServer(create_app(lm)) as server:
        client = server.client()

        def run(text):
            return chat(client, text, model=model, max_tokens=12).choices[0].message.content

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(run, texts)) == expected
        r = chat(client, texts[0], model=model, max_tokens=4, logprobs=True, top_logprobs=20)
        ids = encode_prompt(lm.tokenizer, texts[0])
        logits = mlx_logits(lm.model, ids)[-1].astype(np.float64)[:512]  # decodable ones
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        top = r.choices[0].logprobs.content[0].top_logprobs
        assert [t.logprob for t in top] == pytest.approx(np.sort(logp)[::-1][:20], abs=1e-4)


def test_disconnect_frees_the_slot_and_429_past_the_queue(endless_lm, caplog):
    caplog.set_level("INFO", logger="mlxlocal.serve")
    app = create_app(endless_lm, max_concurrency=1, queue=1, log_prompts=True)
    model = endless_lm.path.name
    with LiveServer(app) as server:
        client = server.client()
        long_one = chat(client, "the fox", model=model, max_tokens=8000, stream=True)
        next(iter(long_one))  # running: the only slot is taken
        queued_result = {}

        def queued():
            r = chat(client, "a lazy dog", model=model, max_tokens=6)
            queued_result["text"] = r.choices[0].message.content

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(queued)
            deadline = time.monotonic() + 60
            while server.engine.load < 2:  # the second request waits in the queue
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as refused:
                chat(client, "too many", model=model, max_tokens=2)
            assert refused.value.response.headers["Retry-After"] == "1"
            assert refused.value.body["code"] == "rate_limit_exceeded"
            long_one.close()  # the client goes away: its sequence must leave the batch
            waiting.result(timeout=120)
        assert queued_result["text"] == generate(endless_lm, "a lazy dog", max_tokens=6).text
        deadline = time.monotonic() + 60
        while server.engine.load:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "mlxlocal.serve"]
    posts = [line for line in lines if "POST /v1/chat/completions" in line]
    assert any(" 429 " in line for line in posts)
    cancelled = next(line for line in posts if '"the fox"' in line)
    generated = int(re.search(r"completion_tokens=(\d+)", cancelled).group(1))
    assert 0 < generated < 8000  # stopped long before its max_tokens
    assert all(re.search(r" \d\.\d{3}s", line) for line in posts)


def test_a_client_that_stops_waiting_for_a_whole_answer_cancels_it(endless_lm, caplog):
    caplog.set_level("INFO", logger="mlxlocal.serve")
    model = endless_lm.path.name
    with LiveServer(create_app(endless_lm, max_concurrency=1, queue=0)) as server:
        impatient = server.client(timeout=1.0)
        with pytest.raises(openai.APITimeoutError):
            chat(impatient, "the lazy fox", model=model, max_tokens=8000)
        deadline = time.monotonic() + 60
        while server.engine.load:  # the slot frees without the answer being finished
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = chat(server.client(), "the fox", model=model, max_tokens=5)
        expected = generate(endless_lm, "the fox", max_tokens=5).text
        assert r.choices[0].message.content == expected
    line = next(r.getMessage() for r in caplog.records if " 499 " in r.getMessage())
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 8000


def test_access_log_has_no_prompt_text_by_default(client, caplog):
    caplog.set_level("INFO", logger="mlxlocal.serve")
    chat(client, "secret words here", max_tokens=2)
    # The line is written once the response is sent, so the client may read it first.
    for _ in range(200):
        lines = [r.getMessage() for r in caplog.records if r.name == "mlxlocal.serve"]
        if lines:
            break
        time.sleep(0.05)
    line = lines[-1]
    assert "POST /v1/chat/completions 200" in line and "prompt_tokens=" in line
    assert "secret" not in line


# --- the command: address safety and the API key -----------------------------------------------


def test_non_loopback_host_needs_a_key_or_insecure(tiny_mlx):
    result = CliRunner().invoke(cli, ["serve", str(tiny_mlx), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "--api-key" in result.output
    assert check_host("0.0.0.0", None, insecure=True).startswith("serving on 0.0.0.0")
    assert check_host("0.0.0.0", "key", insecure=False) is None
    assert check_host("::1", None, insecure=False) is None
    bad = CliRunner().invoke(cli, ["serve", str(tiny_mlx), "--adapter", "nameless"])
    assert bad.exit_code == 1 and "NAME=DIR" in bad.output


def test_mlxlocal_serve_enforces_its_api_key(tiny_mlx):
    code = "from mlxlocal.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(tiny_mlx), "--port", "0", "--api-key", "s3cret"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line):
                url = m.group(1)
                break
        assert url, "the server did not say where it listens"
        from openai import OpenAI

        for key in ("wrong", "s3cret-and-more", "s3cre"):
            with pytest.raises(openai.AuthenticationError):
                OpenAI(base_url=url, api_key=key, max_retries=0).models.list()
        status, bare = http("POST", f"{url}/chat/completions", b"{not even json")
        assert status == 401 and bare["error"]["code"] == "invalid_api_key"
        good = OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        r = good.chat.completions.create(
            model=tiny_mlx.name, messages=[{"role": "user", "content": "the fox"}],
            max_tokens=6, temperature=0,
        )  # fmt: skip
        assert r.choices[0].message.content == generate(load_model(tiny_mlx), "the fox",
                                                        max_tokens=6).text  # fmt: skip
        assert http("GET", url.removesuffix("/v1") + "/health")[0] == 200
    finally:
        proc.terminate()
        proc.wait(30)


# --- the prefix cache ----------------------------------------------------------------------------


def _conversation_turns(client, model, texts, max_tokens=10):
    """Answers to a conversation of len(texts) user turns, each resending the whole history."""
    messages, answers = [], []
    for text in texts:
        messages.append({"role": "user", "content": text})
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0
        )
        answers.append(r.choices[0].message.content)
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers, messages


@pytest.mark.parametrize("budget", [64 * 2**20, 1])
def test_prefix_cache_reuses_turns_and_answers_alike(tiny_lm, adapter_dirs, budget):
    from mlxlocal.generate import Stream, render_chat

    texts = prompts(4, seed=21, longest=12)
    model = tiny_lm.path.name
    app = create_app(tiny_lm, {"lora": adapter_dirs["lora"]}, prefix_cache=budget)
    with LiveServer(app) as server:
        client = server.client()
        answers, messages = _conversation_turns(client, model, texts)
        # Each turn equals generating from the whole rendered conversation with no cache.
        for turn in range(len(texts)):
            ids = render_chat(tiny_lm.tokenizer, messages[: 2 * turn + 1])
            assert answers[turn] == "".join(Stream(tiny_lm, ids, max_tokens=10)), turn
        reused = server.engine.reused_tokens
        # The same prompt twice, and an adapter over the same conversation: still exact.
        again = client.chat.completions.create(
            model=model, messages=messages[:-1], max_tokens=10, temperature=0
        )
        assert again.choices[0].message.content == answers[-1]
        lora = load_model(tiny_lm.path, adapter_dirs["lora"])
        adapted, _ = _conversation_turns(client, "lora", texts[:2])
        first = render_chat(tiny_lm.tokenizer, [{"role": "user", "content": texts[0]}])
        assert adapted[0] == "".join(Stream(lora, first, max_tokens=10))
    if budget == 1:  # nothing fits: nothing is kept, nothing reused
        assert server.engine.reused_tokens == 0
    else:  # turn n reuses at least turn n-1's prompt
        turns = [render_chat(tiny_lm.tokenizer, messages[: 2 * t + 1]) for t in range(4)]
        assert reused >= sum(len(t) for t in turns[:-1])


def test_prefix_cache_holds_no_more_than_it_counts(tiny_lm):
    """Finished sequences' caches are cut out of their batch's: kept lazily, each would hold the
    whole batch's KV buffer alive while counting only its own rows."""
    import mlx.core as mx

    app = create_app(tiny_lm, {}, max_concurrency=8, prefix_cache=256 * 2**20)
    with LiveServer(app) as server:
        client = server.client()
        chat(client, "warm up", model=tiny_lm.path.name, max_tokens=2)
        mx.clear_cache()
        before, kept = mx.get_active_memory(), server.engine.kept_bytes
        texts = prompts(8, seed=5, longest=40)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda t: chat(client, t, model=tiny_lm.path.name, max_tokens=24), texts))
        while server.engine.load:
            time.sleep(0.01)
        held, kept = mx.get_active_memory() - before, server.engine.kept_bytes - kept
        assert kept > 0
        assert held <= 1.25 * kept, (held, kept)


def test_prefix_cache_keeps_twice_max_concurrency_answers(tiny_lm):
    """Each lookup walks the stored prompts that share the new one's first tokens (every
    prompt shares the chat template's header), so the store is bounded in entries too: the
    most recent ones stay, and a chat's next turn still finds its previous answer."""
    app = create_app(tiny_lm, {}, max_concurrency=2, prefix_cache=256 * 2**20)
    with LiveServer(app) as server:
        client = server.client()
        texts = prompts(7, seed=11)
        answers = [chat(client, t, model=tiny_lm.path.name, max_tokens=4) for t in texts]
        assert len(server.engine._prefixes) == 4
        before = server.engine.reused_tokens
        messages = [
            {"role": "user", "content": texts[-1]},
            {"role": "assistant", "content": answers[-1].choices[0].message.content},
            {"role": "user", "content": "and then?"},
        ]
        client.chat.completions.create(
            model=tiny_lm.path.name, messages=messages, temperature=0, max_tokens=4
        )
        assert server.engine.reused_tokens > before
