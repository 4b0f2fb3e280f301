"""The OpenAI request bodies the server accepts, as pydantic models, and its error object.

Fields OpenAI defines that change nothing here (`user`, `store`, `metadata`...) are accepted and
ignored; fields that would change the answer but are not supported (`n` > 1, `echo`...) are
refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..checkpoint.inputs import JSONProblem, decode_json

MAX_STOP = 16


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


def error_object(message: str, type: str, param: str | None = None, code: str | None = None):
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": ErrorBody(message=message, type=type, param=param, code=code).model_dump()}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id... go to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(p.text for p in self.content)
        if self.role == "developer":  # OpenAI's newer name for the system role
            message["role"] = "system"
        message.setdefault("content", "")
        for call in message.get("tool_calls") or []:
            _arguments_as_object(call)
        return message


def _arguments_as_object(call: Any) -> None:
    """OpenAI sends a tool call's arguments as a JSON string; chat templates (Qwen's, Llama's,
    Mistral's) write them with `tojson` and expect the object, as transformers documents — a
    string would reach the model encoded twice. A string that is not a JSON object stays as is."""
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if isinstance(arguments, str):
        try:
            parsed = decode_json(arguments)
        except JSONProblem:
            return
        if isinstance(parsed, dict):
            function["arguments"] = parsed


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Generation(BaseModel):
    """What chat and plain completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    # text, json_object, or json_schema {"name", "schema", "strict"}: see constraints.py
    response_format: dict[str, Any] | None = None

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stop if s]


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
