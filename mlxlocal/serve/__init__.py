"""`serve`: an OpenAI-compatible HTTP API over one model and its adapters, on this machine.

`create_app` builds the ASGI application (tests and embedders use it); `serve` checks the address,
binds it and runs uvicorn until interrupted.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import MlxLocalError
from ..generate import LoadedModel

__all__ = ["create_app", "serve", "check_host"]


def create_app(*args, **kwargs):
    """See `mlxlocal.serve.app.create_app` (imported on use: FastAPI is not light)."""
    from .app import create_app

    return create_app(*args, **kwargs)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Refuse to listen beyond this machine without an API key (unless `insecure`); the warning
    to print when it does anyway."""
    if is_loopback(host) or api_key:
        return None
    if not insecure:
        raise MlxLocalError(
            f"--host {host} lets other machines reach the model: set --api-key KEY (clients "
            "send 'Authorization: Bearer KEY'), or pass --insecure to serve without one"
        )
    return f"serving on {host} without an API key: anyone who can reach this port can use it"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MlxLocalError(f"--host {host}: cannot resolve it ({e.strerror})") from e
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise MlxLocalError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
        ) from e
    sock.set_inheritable(True)
    return sock


def serve(
    model: str | Path | LoadedModel,
    adapters: dict[str, str | Path] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    insecure: bool = False,
    max_concurrency: int = 16,
    queue: int = 64,
    log_prompts: bool = False,
    note: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> None:
    """Serve until interrupted. Checks the address before loading anything."""
    import uvicorn

    warning = check_host(host, api_key, insecure)
    sock = bind(host, port)
    try:
        if warning:
            note(f"warning: {warning}")
        logger = logging.getLogger("mlxlocal.serve")
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        app = create_app(model, adapters, api_key=api_key, max_concurrency=max_concurrency,
                         queue=queue, log_prompts=log_prompts)  # fmt: skip
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        note(f"serving {', '.join(app.state.engine.variants)} at http://{shown}:{bound_port}/v1 "
             "(Ctrl-C stops)")  # fmt: skip
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
