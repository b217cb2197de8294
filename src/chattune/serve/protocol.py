"""The OpenAI wire protocol of `chattune serve`, typed: request and response models (pydantic), OpenAI's errors.

Requests are validated here, at the edge, so the routes get typed values they can trust. Every model forbids fields
it does not declare: an unknown field is refused by name (400, `param` names it), never silently ignored. Each
field's type and range come from its declaration; a value the server cannot honour (e.g. `n > 1`, a `logit_bias`,
forcing a tool call) is refused with the reason by the model's own check. `parse(Model, body)` turns pydantic's
first error into one line that names the field (`invalid_request_error`), the shape OpenAI's clients expect:
`{"error": {"message", "type", "param", "code"}}`.

The chat `messages` themselves are checked message by message in serve/convert.py (`to_conversation`), which turns
them into chattune's Conversation with messages of its own (roles, content parts, tool calls).

Response models are written out with `dump()`: fields listed in a model's `OMIT_NONE` are left out when they are
None (OpenAI leaves them out: a delta without `content`, a message without `tool_calls`); every other field is
always written.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.kind, param=self.param,
                                               code=self.code)).dump()


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, message, param, "unsupported_parameter")


# ---------------------------------------------------------------------------------------------------- requests

def field(default: Any = ..., expect: str | None = None, high: str | None = None, **kw) -> Any:
    """A request field. `expect`: what the field must be, for the error message ("`stop` must be EXPECT"); `high`:
    the upper bound in words where it is not a number (e.g. the model's context)."""
    extra = {k: v for k, v in (("expect", expect), ("high", high)) if v is not None}
    return Field(default, json_schema_extra=extra or None, **kw)


def _neutral(value: Any, allowed: Any, name: str) -> None:
    """OpenAI fields accepted only at the value that asks for nothing this server would have to do."""
    if value is not None and not (value == allowed and type(value) is type(allowed)):
        raise unsupported(name, f"`{name}`={value!r} is not supported by this server (only {allowed!r})")


def _lone_surrogate(data: Any) -> str | None:
    """Where the first string (or key) holding a lone UTF-16 surrogate is: JSON's `\\ud800` escapes let one in,
    but it is no text, and encoding it later (a tokenizer, a stop string) would fail inside the server. A loop, not
    recursion: the body may be nested as deep as the JSON reader allows."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(value, dict):
            for key, item in value.items():
                name = key.encode("utf-8", "backslashreplace").decode()  # printable, a surrogate included
                here = f"{where}.{name}" if where else name
                stack += [(here, key), (here, item)]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    return None


class _Request(BaseModel):
    # strict: no "1" for 1, no 2.0 for an integer, no true for a number; NaN and infinities are refused
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """A declared field sent as null takes its default, as OpenAI's API reads it (unknown ones stay, refused)."""
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        where = _lone_surrogate(data)
        if where is not None:
            raise ApiError(400, f"`{where}` holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape not in a "
                                "pair), which is not text; send valid Unicode", where or None)
        return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields)}

    @classmethod
    def honoured(cls) -> list[str]:
        return sorted(name for name in cls.model_fields if name != "user")


class _Sampling(_Request):
    """The fields chat and plain completions share."""
    MAX_STOPS: ClassVar[int] = 4  # OpenAI's limit
    model: str | None = field(None, "a string")
    stream: bool = field(False, "true or false")
    stream_options: dict | None = field(None, "an object")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = field(None, "a string or a list of strings")
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1)  # torch.Generator's range
    n: int = 1
    logit_bias: dict | None = field(None, "an object")
    user: str | None = field(None, "a string")  # accepted, no effect: the server keeps no per-user record

    @model_validator(mode="after")
    def _refuse(self):
        if self.n != 1:
            raise unsupported("n", f"`n`={self.n!r} is not supported: this server returns one choice per request")
        if self.stop is not None and not isinstance(self.stop, str) and len(self.stop) > self.MAX_STOPS:
            raise ApiError(400, f"`stop` takes at most {self.MAX_STOPS} strings here (got {len(self.stop)})", "stop")
        _neutral(self.logit_bias, {}, "logit_bias")
        if self.stream_options is not None and set(self.stream_options) - {"include_usage"}:
            raise unsupported("stream_options",
                              "`stream_options` takes only `include_usage` here (the last chunk carries usage)")
        return self

    @property
    def stops(self) -> list[str]:
        """The stop strings, empty ones left out."""
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""
    messages: list[Any] = field(..., "a non-empty list", min_length=1)
    max_tokens: int | None = field(None, high="the model's context length", ge=1)
    max_completion_tokens: int | None = field(None, high="the model's context length", ge=1)
    tools: list[Any] | None = field(None, "a list")
    tool_choice: Any = None
    parallel_tool_calls: bool | None = field(None, "true or false")
    response_format: Any = None
    logprobs: bool = field(False, "true or false")
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _refuse_chat(self):
        if self.tool_choice not in (None, "auto", "none"):
            raise unsupported("tool_choice", f"`tool_choice`={self.tool_choice!r} is not supported: this server can "
                                             "offer tools (`auto`) or not (`none`), not force a call")
        _neutral(self.parallel_tool_calls, True, "parallel_tool_calls")
        if self.response_format is not None and self.response_format != {"type": "text"}:
            raise unsupported("response_format", f"`response_format`={self.response_format!r} is not supported: "
                                                 'this server answers in text only (`{"type": "text"}`)')
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "`top_logprobs` needs `logprobs: true`", "top_logprobs")
        return self

    @property
    def answer_tokens(self) -> int | None:
        """max_completion_tokens (OpenAI's newer name) or max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprob_alternatives(self) -> int | None:
        """None: no logprobs; else how many most likely alternatives each token lists."""
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    """POST /v1/completions (plain text in, text out: no chat template)."""
    MAX_STOPS = 16  # more than OpenAI's 4, as vLLM: lm-eval adds the tokenizer's EOS text to a task's own stops
    prompt: Prompt = field(..., "a string, a list of strings, a list of token ids or a list of such lists")
    max_tokens: int | None = field(None, high="the model's context length", ge=0)
    echo: bool = field(False, "true or false")
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = field(None, "a string")

    @model_validator(mode="after")
    def _refuse_completion(self):
        _neutral(self.best_of, 1, "best_of")
        if self.suffix:
            raise unsupported("suffix", "`suffix` is not supported: this server completes text left to right only")
        prompts = self.prompts
        if not prompts or any(not p for p in prompts):
            raise ApiError(400, "`prompt` is empty: give some text or token ids", "prompt")
        if self.stream and len(prompts) > 1:
            raise unsupported("stream", f"`stream` takes one prompt here (got {len(prompts)}); send the prompts "
                                        "as separate requests")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "`max_tokens`=0 returns nothing without `echo: true`", "max_tokens")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def _param(loc: tuple) -> str:
    """`messages[0].role` from pydantic's location ('messages', 0, 'role'); union branches ('list[str]') dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool"):
            break  # a union branch: the field's own expectation says it better
        else:
            out += ("." if out else "") + part
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounds(info) -> tuple[Any, Any]:
    """A field's range: its `ge` and `le`, the upper bound in words where it has no number."""
    low = high = None
    for m in info.metadata:
        low = getattr(m, "ge", low)
        high = getattr(m, "le", high)
    return low, high if high is not None else (info.json_schema_extra or {}).get("high")


TYPES = {"float_type": "a number", "finite_number": "a finite number", "int_type": "an integer",
         "bool_type": "true or false", "string_type": "a string", "list_type": "a list", "dict_type": "an object",
         "int_from_float": "an integer"}


def explain(error: dict, model: type[BaseModel]) -> ApiError:
    """One of pydantic's errors as the 400 a client reads: the field, what it must be, what it got."""
    name = error["loc"][0] if error["loc"] else ""
    info = model.model_fields.get(name) if isinstance(name, str) else None
    param = _param(error["loc"]) or None
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return unsupported(param, f"unsupported parameter `{param}`: this server does not implement it (it reads "
                                  f"{', '.join(model.honoured())})")
    if kind in ("greater_than_equal", "less_than_equal") and info is not None:
        low, high = _bounds(info)
        return ApiError(400, f"`{name}` must be between {low} and {high}, got {_short(value)}", name)
    expect = (info.json_schema_extra or {}).get("expect") if info is not None else None
    if expect and kind in ("missing", "too_short"):
        return ApiError(400, f"`{name}` must be {expect}", name)
    if expect:
        return ApiError(400, f"`{name}` must be {expect}, got {_short(value)}", name)
    if kind in TYPES:
        return ApiError(400, f"`{param}` must be {TYPES[kind]}, got {_short(value)}", param)
    return ApiError(400, f"`{param}`: {error['msg']}", param)


def parse(model: type[_Request], body: Any) -> Any:
    """`body` as a `model` request; the first problem (an unknown field before anything else) as an ApiError."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        raise explain(first, model) from None


# --------------------------------------------------------------------------------------------------- responses

class _Out(BaseModel):
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self.OMIT_NONE)}

    def dump(self) -> dict:
        return self.model_dump(mode="json")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorDetail


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob] | None


class FunctionCall(_Out):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Out):
    OMIT_NONE = frozenset({"index"})
    index: int | None = None  # in a streamed delta only
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Out):
    OMIT_NONE = frozenset({"tool_calls"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Out):
    index: int = 0
    message: ChatMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    OMIT_NONE = frozenset({"role", "content", "tool_calls"})
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChunkChoice(_Out):
    OMIT_NONE = frozenset({"logprobs"})
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Out):
    OMIT_NONE = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out):
    """The legacy completions shape: one entry per token in each list (the first prompt token has no logprob)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Out):
    """A plain completion, or one chunk of a streamed one (the same object, as OpenAI sends it)."""
    OMIT_NONE = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "chattune"
    template: str
    method: str | None = None
    parent: str | None = None  # an adapter's base model id (vLLM's field); None for a base


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]
