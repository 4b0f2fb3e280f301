"""serve: aggregate generated tok/s of `mlxlocal serve` vs `mlx_lm.server` on the same model with
1, 4 and 16 concurrent clients, each server's peak memory, and the time to the first token of a
chat's 5th turn with the prefix cache vs without.

Each server runs as a child process on a free loopback port (16 sequences decoded at once, 8
prompts processed at once, for both), answers a warm-up request, then serves the same greedy chat
requests at each client count: every client sends its requests one after another, all clients at
once; tok/s is the completion tokens the servers report over the wall time of the whole round.
Every round has texts of its own, new to both servers: repeated ones would be answered from each
server's prefix cache (ours holds every recent prompt, mlx_lm.server's 10 by default), which the
5th-turn figure measures on its own.
Both servers stay up and the rounds alternate between them (A/B/A/B). Peak memory is each server
process's peak RSS (from the kernel, via wait4, once it is stopped).

The decode rate at 16 clients: mlx-lm's `BatchGenerator` in a child process, no server,
decoding 16 requests at once, timed once all 16 decode (no prompt processing in the time).
Each server's 16-client tok/s is also given as a share of it: what its scheduling, prompt
processing and HTTP leave of mlx-lm's batched decoding (ours decodes with a step of its own,
`mlxlocal/serve/batching.py`, so its share can pass 1).

The model's tokenizer has a token for every id of its 32000-wide embedding (`fill_vocab`): with
ids that decode to nothing, mlx_lm.server samples them (answers of "!!!!") and never meets EOS,
while ours masks them and ends earlier, and the two would not do the same work.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .generate import model_path

CLIENTS = (1, 4, 16)
REQUESTS_PER_CLIENT = {"smoke": 1, "tiny": 1, "small": 3, "medium": 3}
MAX_TOKENS = {"smoke": 8, "tiny": 32, "small": 64, "medium": 64}
TURN_WORDS, TURN_TOKENS = 30, 24  # each turn of the chat whose 5th turn is timed
# The fewest chats whose turn 5 is timed (the median is reported).
CHATS = {"smoke": 1, "tiny": 3, "small": 3, "medium": 3}
WORDS = "the quick brown fox jumps over a lazy dog while your local model keeps the data".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def _child_env() -> dict[str, str]:
    # MKL single-threaded, as `mlxlocal serve` runs it (mlxlocal/blas.py), for every child.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MKL_THREADING_LAYER": "SEQUENTIAL"}


class Server:
    """A server child process, ready once /health answers and a first request went through."""

    def __init__(self, command: list[str], port: int, model_id: str):
        self.url = f"http://127.0.0.1:{port}"
        self.model_id = model_id
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_child_env()
        )
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited ({self.proc.returncode})")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"{' '.join(command)} did not come up")
            time.sleep(0.2)
        self.chat("warm up", 8)

    def chat(self, text: str, max_tokens: int) -> int:
        """Completion tokens of one greedy chat request."""
        answer = _post(
            f"{self.url}/v1/chat/completions",
            {
                "model": self.model_id,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        return answer["usage"]["completion_tokens"]

    def first_token_seconds(self, messages: list[dict], max_tokens: int) -> tuple[float, str]:
        """(seconds to the first streamed piece of text, the whole answer) of one greedy chat."""
        body = {"model": self.model_id, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0, "stream": True}  # fmt: skip
        request = urllib.request.Request(
            f"{self.url}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        tic, first, pieces = time.perf_counter(), None, []
        with urllib.request.urlopen(request, timeout=600) as r:
            for line in r:
                data = line.decode().strip().removeprefix("data:").strip()
                if not data or data == "[DONE]" or line.startswith(b":"):
                    continue
                choices = json.loads(data).get("choices") or [{}]
                piece = (choices[0].get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter() - tic
                    pieces.append(piece)
        return first if first is not None else time.perf_counter() - tic, "".join(pieces)

    def round(self, texts: list[list[str]], max_tokens: int) -> tuple[float, int]:
        """(wall seconds, completion tokens) for one client per list of texts, all at once."""

        def client(mine: list[str]) -> int:
            return sum(self.chat(t, max_tokens) for t in mine)

        tic = time.perf_counter()
        with ThreadPoolExecutor(len(texts)) as pool:
            tokens = sum(pool.map(client, texts))
        return time.perf_counter() - tic, tokens

    def stop(self) -> float:
        """Stop the server; its peak RSS in MB."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, _, usage = os.wait4(self.proc.pid, 0)
        except ChildProcessError:
            return float("nan")
        self.proc.returncode = 0
        return usage.ru_maxrss / 1024


def decode_rate(model: str, max_tokens: int, texts: list[str]) -> float:
    """Generated tok/s of mlx-lm's batched decoding alone: one sequence per text (as a chat
    request), all decoded together, timed from the first step with all of them decoding; no
    prompt processing and no server in the time."""
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    lm, tokenizer = load(model)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        for t in texts
    ]
    n, rates = len(prompts), []
    for _ in range(2):  # MLX's CPU back end compiles its kernels on first use: a warm-up first
        gen = BatchGenerator(lm, completion_batch_size=n, prefill_batch_size=n)
        gen.insert(prompts, [max_tokens] * n)
        tic, tokens, finished = None, 0, False
        while not finished:
            _, responses = gen.next()
            finished = any(r.finish_reason is not None for r in responses)
            if tic is not None:
                tokens += len(responses)
            elif len(responses) == n:
                tic = time.perf_counter()
        rates.append(tokens / (time.perf_counter() - tic))
        gen.close()
    return rates[-1]


def _decode_rate(model: Path, max_tokens: int, texts: list[str]) -> float:
    """`decode_rate` in a child process with the servers' environment."""
    code = ("import json, sys; from benchmarks.serve import decode_rate; "
            "print(decode_rate(sys.argv[1], int(sys.argv[2]), json.load(sys.stdin)))")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code, str(model), str(max_tokens)],
        input=json.dumps(texts), capture_output=True, text=True, env=_child_env(), check=True,
    )  # fmt: skip
    return float(done.stdout.split()[-1])


def _conversation(server: Server, texts: list[str], max_tokens: int) -> list[float]:
    """Seconds to the first token of each turn of one chat that resends its history."""
    messages, seconds = [], []
    for text in texts:
        messages.append({"role": "user", "content": text})
        took, answer = server.first_token_seconds(messages, max_tokens)
        seconds.append(took)
        messages.append({"role": "assistant", "content": answer})
    return seconds


def _commands(model: Path, port: int) -> dict[str, list[str]]:
    ours = [sys.executable, "-c", "from mlxlocal.cli import main; main()", "serve", str(model),
            "--port", str(port), "--max-concurrency", "16"]  # fmt: skip
    theirs = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port",
              str(port), "--decode-concurrency", "16", "--prompt-concurrency", "8",
              "--log-level", "WARNING"]  # fmt: skip
    return {"mlxlocal": ours, "mlx_lm": theirs, "no_prefix_cache": [*ours, "--prefix-cache", "0"]}


def run(size: str, reps: int, work: Path) -> dict:
    model = model_path(size, work, fill_vocab=True)
    per_client = REQUESTS_PER_CLIENT[size]
    rng = np.random.default_rng(3)

    def fresh(clients: int) -> list[list[str]]:
        """Texts no server has seen: a prompt sent again would be answered from the prefix
        cache (each server's holds a different number of them), not measure the batching."""
        lengths = rng.integers(8, 60, (clients, per_client))
        return [[" ".join(rng.choice(WORDS, n)) for n in row] for row in lengths]

    # The model id each server answers to: ours names the base after its folder; mlx_lm.server
    # takes the path it was started with.
    ids = {"mlxlocal": model.name, "mlx_lm": str(model)}
    runs: dict[str, dict[int, list[tuple[float, int]]]] = {
        name: {n: [] for n in CLIENTS} for name in ids
    }
    # Both servers stay up; rounds alternate between them (A/B/A/B at each client count), so
    # the drift of a shared machine hits both alike.
    servers = {}
    try:
        for name in ids:
            port = _free_port()
            servers[name] = Server(_commands(model, port)[name], port, ids[name])
        rates = []
        for _ in range(reps):
            for n in CLIENTS:
                texts = fresh(n)  # the same for both servers
                for name, server in servers.items():
                    runs[name][n].append(server.round(texts, MAX_TOKENS[size]))
            rates.append(_decode_rate(model, MAX_TOKENS[size], [c[0] for c in fresh(16)]))
        # Time to the first token of turn 5 of a chat, with the prefix cache and without (a
        # fresh conversation each repetition, so no turn is cached before it is sent).
        port = _free_port()
        servers["no_prefix_cache"] = Server(
            _commands(model, port)["no_prefix_cache"], port, ids["mlxlocal"]
        )
        # At least 3 chats even in a 1-repetition run (but --size smoke): one chat's turn 5 is
        # a single ~0.1-1 s figure, which a loaded machine can double.
        turns = {"mlxlocal": [], "no_prefix_cache": []}
        for rep in range(max(reps, CHATS[size])):
            chat = [" ".join(rng.choice(WORDS, TURN_WORDS)) + f" ({rep})" for _ in range(5)]
            for name in turns:
                turns[name].append(_conversation(servers[name], chat, TURN_TOKENS)[-1])
    finally:
        peaks = {name: [server.stop()] for name, server in servers.items()}
    result: dict = {
        "size": size,
        "requests_per_client": per_client,
        "max_tokens": MAX_TOKENS[size],
    }
    for name in ids:
        result[name] = {
            f"{n}_clients_tok_per_s": round(
                statistics.median(tokens / wall for wall, tokens in runs[name][n]), 1
            )
            for n in CLIENTS
        }
        result[name]["peak_rss_mb"] = round(statistics.median(peaks[name]), 1)
    for n in CLIENTS:
        key = f"{n}_clients_tok_per_s"
        result[f"ratio_{n}_clients"] = round(result["mlxlocal"][key] / result["mlx_lm"][key], 3)
    rate = statistics.median(rates)
    result["decode_rate_16"] = {
        "tok_per_s": round(rate, 1),
        "mlxlocal": round(result["mlxlocal"]["16_clients_tok_per_s"] / rate, 3),
        "mlx_lm": round(result["mlx_lm"]["16_clients_tok_per_s"] / rate, 3),
    }
    with_cache, without = (statistics.median(turns[n]) for n in ("mlxlocal", "no_prefix_cache"))
    result["turn5_first_token_ms"] = {
        "prefix_cache": round(1000 * with_cache, 1),
        "no_prefix_cache": round(1000 * without, 1),
        "ratio": round(with_cache / without, 3),
    }
    result["ratio_peak_rss"] = round(
        result["mlxlocal"]["peak_rss_mb"] / result["mlx_lm"]["peak_rss_mb"], 3
    )
    return result


def table(result: dict) -> list[str]:
    ours, theirs = result["mlxlocal"], result["mlx_lm"]
    targets = {1: "≥ 1.0×", 4: "", 16: "≥ 1.5×"}
    setup = f"{result['requests_per_client']} chats × ≤ {result['max_tokens']} tokens per client"
    rows = [
        f"| serve aggregate tok/s, {n} client{'s' if n > 1 else ''} ({setup}) vs mlx_lm.server "
        f"| {ours[f'{n}_clients_tok_per_s']} | {theirs[f'{n}_clients_tok_per_s']} "
        f"| {result[f'ratio_{n}_clients']}× | {targets[n]} |"
        for n in CLIENTS
    ]
    d = result["decode_rate_16"]
    rows.append(
        f"| serve at 16 clients as a share of mlx-lm's batched decoding of 16 alone (no server, "
        f"no prompts: {d['tok_per_s']} tok/s) | {d['mlxlocal']} | {d['mlx_lm']} | | |"
    )
    t = result["turn5_first_token_ms"]
    rows.append(
        f"| serve time to first token, turn 5 of a chat ({TURN_WORDS} words a turn, "
        f"≤ {TURN_TOKENS}-token answers): prefix cache vs none | {t['prefix_cache']} ms "
        f"| {t['no_prefix_cache']} ms (mlxlocal, --prefix-cache 0) | {t['ratio']}× | ≤ 0.3× |"
    )
    rows.append(
        f"| serve peak RSS vs mlx_lm.server | {ours['peak_rss_mb']} MB "
        f"| {theirs['peak_rss_mb']} MB | {result['ratio_peak_rss']}× | ≤ 1.1× |"
    )
    return rows
