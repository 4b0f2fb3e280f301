"""Where a checkpoint comes from: a typo never reaches the network, Hub failures are one line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from mlxlocal.cli import cli
from mlxlocal.errors import MlxLocalError
from mlxlocal.sources import is_hub_id, resolve_source


@pytest.fixture
def online(tmp_path, monkeypatch):
    """Online mode with an empty cache; `calls` records every snapshot_download call."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("local_files_only", False)))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise AssertionError(f"{repo_id} was sent to the Hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize(
    ("src", "why"),
    [
        ("runs/my-modle", "runs/ is a local folder, so this is a path"),
        ("models/llama.gguf", "not a path or a file"),
        ("org/weights.safetensors", "not a path or a file"),
        ("org/pytorch_model.bin", "not a path or a file"),
        ("./org/name", "not a path or a file"),
        ("../org/name", "not a path or a file"),
        ("~/org/name", "not a path or a file"),
        ("/org/name", "not a path or a file"),
        ("name", "not a path or a file"),
    ],
)
def test_a_missing_path_is_never_sent_to_the_hub(online, tmp_path, src, why):
    (tmp_path / "runs").mkdir()
    with pytest.raises(MlxLocalError, match="no such folder") as raised:
        resolve_source(src)
    assert why in str(raised.value) and "\n" not in str(raised.value)
    assert online == [] and not is_hub_id(src)


def test_the_cli_says_one_line_for_a_mistyped_gguf(online, tmp_path):
    result = CliRunner().invoke(cli, ["convert", "models/llama.gguf", str(tmp_path / "out")])
    assert result.exit_code == 1 and online == []
    assert result.output.splitlines() == [
        "error: models/llama.gguf: no such folder (a Hugging Face repo id is org/name, not a "
        "path or a file)"
    ]


def test_info_looks_only_in_the_cache(online):
    result = CliRunner().invoke(cli, ["info", "tiny-org/not-cached"])
    assert result.exit_code == 1 and online == [("tiny-org/not-cached", True)]
    assert result.output.splitlines() == [
        "error: tiny-org/not-cached is not in the Hugging Face cache: download it first "
        "(`hf download tiny-org/not-cached`), or give a local folder"
    ]


def _failing_download(error: Exception):
    def snapshot_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise error

    return snapshot_download


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            "RemoteProtocolError",
            "download failed (RemoteProtocolError: Server disconnected without sending a "
            "response.); check the network",
        ),
        ("HfHubHTTPError", "download failed (HfHubHTTPError: 502 Bad Gateway); check the network"),
        ("ConnectionResetError", "download failed (ConnectionResetError: [Errno 104] reset)"),
    ],
)
def test_download_failures_are_one_line(online, monkeypatch, error, message):
    from huggingface_hub.utils import httpx

    errors = {
        "RemoteProtocolError": httpx.RemoteProtocolError(
            "Server disconnected without sending a response."
        ),
        "HfHubHTTPError": HfHubHTTPError(
            "502 Bad Gateway\n\nRequest ID: abc\nproxy said no",
            response=httpx.Response(502, request=httpx.Request("GET", "https://huggingface.co")),
        ),
        "ConnectionResetError": ConnectionResetError(104, "reset"),
    }
    monkeypatch.setattr("huggingface_hub.snapshot_download", _failing_download(errors[error]))
    with pytest.raises(MlxLocalError) as raised:
        resolve_source("tiny-org/tiny-llama")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_invalid_repo_id_is_one_line():  # the Hub library's own check, offline
    with pytest.raises(MlxLocalError, match=r"^a\.\.b/c: not a Hugging Face repo id \(") as raised:
        resolve_source("a..b/c")
    assert "\n" not in str(raised.value)
