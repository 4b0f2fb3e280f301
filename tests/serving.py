"""A live `serve` application on a free loopback port, for tests that drive it over HTTP.

conftest's `no_network` refuses every connection; a server test module opts in to loopback
only by importing `loopback_only` as its `no_network` fixture.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mlxlocal.serve import is_loopback


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Like conftest's `no_network`, but connections to this machine's loopback go through."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(real):
        def checked(self, address, *args):
            host = address[0] if isinstance(address, tuple) else address
            if not is_loopback(host):
                raise AssertionError(f"network access attempted: {address}")
            return real(self, address, *args)

        return checked

    monkeypatch.setattr(socket.socket, "connect", guard(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(connect_ex))


class LiveServer:
    """uvicorn serving `app` in a thread on 127.0.0.1:<free port> while the `with` block runs."""

    def __init__(self, app):
        import uvicorn

        from mlxlocal.serve import bind

        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def client(self, api_key: str = "unused", **options):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **options)

    @property
    def engine(self):
        return self.app.state.engine


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one plain HTTP request, whatever the status."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
