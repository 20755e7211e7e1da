"""The OpenAI request shapes the server accepts, their errors, and the mapping to SamplingParams.

Every request model forbids unknown fields: a field we do not implement (tools, ...) would
change the output if honoured, so it is refused with a 400 naming it rather than ignored. Structured outputs come as OpenAI's `response_format` ({"type": "json_object"} or
{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}) or vLLM's
`structured_outputs` ({"json" | "regex" | "choice" | "grammar" | "json_object"}); the schema
is always enforced (strict or not), and one the grammar compiler refuses is a 400 naming the
field. Models are strict (validated from the raw JSON body, so "5" is not an
int and true is not a number); range checks beyond the shape are SamplingParams', whose
ValueError names the field, mapped back here to the request field the client wrote.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jax_infer.sampling import SamplingParams, StructuredOutputsParams

# Most samples of one prompt (`n`): each is an engine request (forked from one prompt
# computation), so this bounds the work one HTTP request can queue.
MAX_N = 16
_U32 = 2**32


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "server_error")
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


# -- request models --------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is enforced either way


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs` extra field: exactly one of these."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI plus vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (a JSON key) -> bias
    prompt_logprobs: int | None = None  # vLLM: top logprobs per prompt token (not streamed)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # the number of top logprobs per token, as OpenAI's legacy API
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# -- errors ----------------------------------------------------------------------------

# pydantic writes union members into an error's location ("prompt", "list[int]", 0); a field
# path keeps names and indices only.
_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def _param(loc: tuple) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif _FIELD_NAME.match(item) and item not in _TYPE_TAGS:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def validation_error(err: ValidationError) -> APIError:
    """A 400 naming the first offending field (and saying what is wrong with it)."""
    first = err.errors()[0]
    param = _param(tuple(first["loc"]))
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}")
    if first["type"] == "extra_forbidden":
        return APIError(
            400, f"unsupported field {param!r}: this server does not implement it", param=param
        )
    return APIError(400, f"{param}: {first['msg']} (got {first.get('input')!r:.80})", param=param)


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as e:
        raise validation_error(e) from None


# -- request -> SamplingParams ----------------------------------------------------------

_SAMPLING_FIELD = re.compile(r"^SamplingParams\.(\w+)=")


def max_tokens_field(req: _Sampling) -> str:
    """The request field that set the output length ("max_completion_tokens" or "max_tokens")."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def request_param(req: _Sampling, field: str) -> str:
    """The request field a SamplingParams field came from."""
    if field == "max_tokens":
        return max_tokens_field(req)
    if field == "logprobs" and isinstance(req, ChatCompletionRequest):
        return "top_logprobs"
    return field


def _logit_bias(raw: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias (JSON keys are strings) keyed by int token id; ranges are checked by
    SamplingParams, the vocabulary by the engine's prompt check."""
    out = {}
    for key, value in raw.items():
        if not key.isdigit():
            raise APIError(
                400,
                f"logit_bias key {key!r} is invalid: must be a token id (a decimal integer >= 0)",
                param="logit_bias",
            )
        out[int(key)] = value
    return out


def sampling_params(req: _Sampling, *, prompt_len: int, max_model_len: int) -> SamplingParams:
    """The request's SamplingParams: `n` samples of each prompt sharing its KV pages, sample i
    seeded `seed + i` (SamplingParams.sample_seed) so samples differ but reproduce; echo with
    logprobs asks for the prompt's logprobs.

    max_tokens defaults to 16 for completions (OpenAI's default) and to what the context has
    room for in chat. Raises APIError 400 naming the request field for an invalid value."""
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = max(max_model_len - prompt_len, 1)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        logprobs = req.logprobs
    if req.seed is not None and not 0 <= req.seed < _U32:
        raise APIError(400, f"seed={req.seed} is invalid: must be in [0, 2**32 - 1]", param="seed")
    knobs = {
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
    }
    for name, value in (
        ("temperature", req.temperature),
        ("top_p", req.top_p),
        ("top_k", req.top_k),
        ("min_p", req.min_p),
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
        ("repetition_penalty", req.repetition_penalty),
        ("stop", req.stop),
        ("stop_token_ids", req.stop_token_ids),
    ):
        if value is not None:
            knobs[name] = value
    if req.logit_bias is not None:
        knobs["logit_bias"] = _logit_bias(req.logit_bias)
    if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
        knobs["prompt_logprobs"] = req.logprobs
    if req.prompt_logprobs is not None:
        if req.stream:
            raise APIError(
                400,
                "prompt_logprobs is not available with stream=true (as in vLLM): "
                "ask without streaming",
                param="prompt_logprobs",
            )
        echoed = knobs.get("prompt_logprobs")  # echo with logprobs asks for some too
        k = req.prompt_logprobs
        knobs["prompt_logprobs"] = k if echoed is None or not isinstance(k, int) else max(k, echoed)
    structured = structured_outputs_params(req)
    if structured is not None:
        knobs["structured_outputs"] = structured
    try:
        return SamplingParams(**knobs, n=req.n, seed=req.seed)
    except ValueError as e:
        match = _SAMPLING_FIELD.match(str(e))
        param = request_param(req, match.group(1)) if match else None
        raise APIError(400, str(e), param=param) from None


def structured_param(req: _Sampling) -> str:
    """The request field that set the structured-output constraint (for a 400's `param`)."""
    if req.structured_outputs is not None:
        return "structured_outputs"
    if req.response_format is not None and req.response_format.type == "json_schema":
        return "response_format.json_schema.schema"
    return "response_format"


def structured_outputs_params(req: _Sampling) -> StructuredOutputsParams | None:
    """The constraint `response_format` or `structured_outputs` asks for (None: free text).
    APIError 400 naming the field when both are given or the shape is wrong; whether the
    schema or grammar compiles is checked against the engine (`check_structured_outputs`)."""
    rf, so = req.response_format, req.structured_outputs
    if rf is not None and rf.type == "text":
        if rf.json_schema is not None:
            raise APIError(
                400,
                'response_format.json_schema is given with type "text"; use type "json_schema"',
                param="response_format.json_schema",
            )
        rf = None
    if rf is not None and so is not None:
        raise APIError(
            400,
            "give one of response_format and structured_outputs, not both",
            param="structured_outputs",
        )
    try:
        if so is not None:
            return StructuredOutputsParams(
                json=so.json_,
                regex=so.regex,
                choice=so.choice,
                grammar=so.grammar,
                json_object=bool(so.json_object),
            )
        if rf is None:
            return None
        if rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(
                400,
                'response_format of type "json_schema" needs json_schema.schema',
                param="response_format.json_schema",
            )
        return StructuredOutputsParams(json=rf.json_schema.schema_)
    except ValueError as e:
        message = str(e).replace("StructuredOutputsParams", structured_param(req), 1)
        raise APIError(400, message, param=structured_param(req)) from None
