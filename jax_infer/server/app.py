"""The HTTP routes: OpenAI's completions, chat completions and models, plus health, metrics,
tokenize and detokenize, over an `AsyncEngine`.

The app owns HTTP concerns only (auth, body limits, request shapes, streaming, errors in
OpenAI's shape); it reads the engine's tokenizer and limits, never its model or cache state.
Bodies are read and validated here rather than by FastAPI's parameter binding, so that every
error (malformed JSON, a wrong type, an unknown field, a body too large) is a 400/413 in
OpenAI's shape naming the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import re
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from jax_infer.engine import prepare_prompt
from jax_infer.outputs import RequestOutput
from jax_infer.server.async_engine import AsyncEngine, ClientDisconnected
from jax_infer.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    max_tokens_field,
    parse,
    sampling_params,
    structured_param,
)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 2 * 2**20


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def build_app(front: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI app over `front` (started and shut down with the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        front.start()
        yield
        front.shutdown()

    app = FastAPI(title="jax_infer", lifespan=lifespan)
    app.state.front = front
    app.state.config = config

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [p for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(str(p) for p in loc) or None
        return error_response(APIError(400, str(first.get("msg", exc)), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        )
        if not ok:
            raise APIError(401, "a valid API key is needed: Authorization: Bearer <key>")

    async def read_body(request: Request) -> bytes:
        limit = config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body of {declared} bytes exceeds {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body exceeds {limit} bytes")
        return bytes(body)

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def engine():
        front.check_ready()
        return front.engine

    # -- health and metrics --------------------------------------------------------------

    @app.get("/health")
    def health():
        if front.is_ready:
            return {"status": "ok"}
        return JSONResponse({"status": front.state, "error": front.error}, status_code=503)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(front.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- tokenizer -------------------------------------------------------------------------

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse(TokenizeRequest, await read_body(request))
        check_model(req.model)
        eng = engine()
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            ids = eng.tokenizer.apply_chat_template(
                [m.as_template_dict() for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
                tokenize=True,
            )
        else:
            ids = eng.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": eng.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse(DetokenizeRequest, await read_body(request))
        check_model(req.model)
        eng = engine()
        bad = [t for t in req.tokens if not 0 <= t < eng.config.vocab_size]
        if bad:
            raise APIError(
                400,
                f"tokens {bad[:5]} are outside the vocabulary [0, {eng.config.vocab_size})",
                param="tokens",
            )
        return {"prompt": eng.tokenizer.decode(req.tokens)}

    # -- OpenAI ----------------------------------------------------------------------------

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    def models():
        max_len = front.engine.max_model_len if front.engine is not None else None
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "jax_infer",
                    "max_model_len": max_len,
                }
            ],
        }

    @v1.post("/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_body(request))
        check_model(req.model)
        eng = engine()
        prompts = _prompt_list(req.prompt)
        jobs, prompt_texts = [], []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            ids = _check_prompt(eng, prompt, req, param)
            prompt_texts.append(prompt if isinstance(prompt, str) else eng.tokenizer.decode(ids))
            params = sampling_params(req, prompt_len=len(ids), max_model_len=eng.max_model_len)
            jobs.append((ids, params))
        return await _generate(
            request, req, jobs, kind="completion", echo=prompt_texts if req.echo else None
        )

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await read_body(request))
        check_model(req.model)
        eng = engine()
        try:
            ids = eng.tokenizer.apply_chat_template(
                [m.as_template_dict() for m in req.messages],
                add_generation_prompt=True,
                tokenize=True,
            )
        except Exception as e:  # a template's raise_exception, e.g. roles out of order
            raise APIError(
                400, f"the chat template refused the messages: {e}", param="messages"
            ) from None
        _check_prompt(eng, ids, req, "messages")
        params = sampling_params(req, prompt_len=len(ids), max_model_len=eng.max_model_len)
        return await _generate(request, req, [(ids, params)], kind="chat")

    async def _generate(request: Request, req, jobs, *, kind: str, echo=None):
        """Submit every (prompt, params) as an engine request (params.n samples each); answer
        in one body or as SSE. Choice i is sample i % n of prompt i // n."""
        flat = jobs
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        stream = front.submit(flat, prefix=response_id)
        index = {rid: i for i, rid in enumerate(stream.request_ids)}
        created = int(time.time())
        tok = front.engine.tokenizer
        head = {"id": response_id, "created": created, "model": config.model_name}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            events = _sse(request, stream, kind, head, index, tok, req, echo, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        final: dict[str, RequestOutput] = {}
        try:
            async for out in front.outputs(stream, request.is_disconnected):
                if out.finished:
                    final[out.request_id] = out
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            front.abort(stream)
        outs = [final[rid] for rid in stream.request_ids]
        for out in outs:
            _raise_if_error(out)
        choices = []
        for rid, out in zip(stream.request_ids, outs):
            i = index[rid]
            if kind == "chat":
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": out.text},
                        "logprobs": _chat_logprobs(out.token_ids, out.logprobs, tok, req),
                        "finish_reason": out.finish_reason,
                        **_prompt_logprobs(out, tok, req),
                    }
                )
            else:
                prefix_text = echo[i // req.n] if echo else ""
                choices.append(
                    {
                        "index": i,
                        "text": prefix_text + out.text,
                        "logprobs": _completion_logprobs(
                            out.token_ids, out.logprobs, tok, req, _echoed(out, echo)
                        ),
                        "finish_reason": out.finish_reason,
                        **_prompt_logprobs(out, tok, req),
                    }
                )
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return {**head, "object": obj, "choices": choices, "usage": _usage(outs, req.n)}

    async def _sse(request, stream, kind, head, index, tok, req, echo, include_usage):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        started: set[str] = set()
        finals: dict[str, RequestOutput] = {}
        num_logprobs: dict[str, int] = {}
        try:
            async for out in front.outputs(stream, request.is_disconnected):
                if out.finish_reason == "error":
                    _raise_if_error(out)
                i = index[out.request_id]
                first = out.request_id not in started
                started.add(out.request_id)
                seen = num_logprobs.get(out.request_id, 0)
                new_ids = out.delta_token_ids
                lps = out.logprobs[seen : seen + len(new_ids)] if out.logprobs else None
                num_logprobs[out.request_id] = seen + len(new_ids)
                if kind == "chat":
                    delta = {"content": out.delta_text}
                    if first:
                        delta = {"role": "assistant", **delta}
                    choice = {
                        "index": i,
                        "delta": delta,
                        "logprobs": _chat_logprobs(new_ids, lps, tok, req),
                        "finish_reason": out.finish_reason,
                    }
                else:
                    text = out.delta_text
                    if first and echo:
                        text = echo[i // req.n] + text
                    choice = {
                        "index": i,
                        "text": text,
                        "logprobs": _completion_logprobs(
                            new_ids, lps, tok, req, _echoed(out, echo) if first else None
                        ),
                        "finish_reason": out.finish_reason,
                    }
                if out.finished:
                    finals[out.request_id] = out
                if not (choice.get("text") or choice.get("delta", {}).get("content")) and not (
                    first or out.finished
                ):
                    continue  # nothing new to say (text held back for a stop string)
                yield _event({**head, "object": obj, "choices": [choice]})
            if include_usage:
                outs = [finals[rid] for rid in stream.request_ids]
                yield _event({**head, "object": obj, "choices": [], "usage": _usage(outs, req.n)})
        except ClientDisconnected:
            return
        except APIError as e:
            yield _event(e.body())
        finally:
            front.abort(stream)
        yield "data: [DONE]\n\n"

    app.include_router(v1)
    return app


# -- helpers ---------------------------------------------------------------------------


def _prompt_list(prompt) -> list:
    """OpenAI's prompt forms as a list of prompts (strings or token-id lists)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return list(prompt)


def _check_prompt(eng, prompt, req, param: str) -> list[int]:
    """Token ids of `prompt`, checked as the engine will (vocabulary, length): a 400 now,
    before a stream's 200 is sent. Too long a request names max_tokens when the client set
    it, else the prompt."""
    ids = eng.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    params = sampling_params(req, prompt_len=len(ids), max_model_len=eng.max_model_len)
    try:
        _, ids = prepare_prompt(
            ids, params, eng.tokenizer, eng.config.vocab_size, eng.max_model_len
        )
    except ValueError as e:
        message = str(e)
        set_max = req.max_tokens is not None or getattr(req, "max_completion_tokens", None)
        if "exceeds max_model_len" in message and set_max is not None:
            param = max_tokens_field(req)
        raise APIError(400, message, param=param) from None
    try:
        if params.structured_outputs is not None:
            eng.check_structured_outputs(params)
    except ValueError as e:
        where = structured_param(req)
        message = str(e)
        if where != "structured_outputs":  # name the field the client wrote
            message = re.sub(r"^structured_outputs\.\w+", where, message)
        raise APIError(400, message, param=where) from None
    return ids


def _raise_if_error(out: RequestOutput) -> None:
    if out.finish_reason == "error":
        raise APIError(500, f"the engine ended the request: {out.error}")


def _usage(outs: list[RequestOutput], n: int) -> dict:
    # A prompt counts once however many samples it has.
    prompt = sum(len(o.prompt_token_ids) for o in outs[::n])
    completion = sum(len(o.token_ids) for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _top(entry: dict[int, float], token: int, n: int) -> list[tuple[int, float]]:
    """The n most likely of a logprob entry (it holds the top n plus the sampled token)."""
    ranked = sorted(entry.items(), key=lambda kv: -kv[1])
    return ranked[:n]


def _echoed(out: RequestOutput, echo) -> tuple[list[int], list] | None:
    """(prompt token ids, their logprob entries) for echo with logprobs, else None."""
    if not echo or out.prompt_logprobs is None:
        return None
    return out.prompt_token_ids, out.prompt_logprobs


def _prompt_logprobs(out: RequestOutput, tok, req) -> dict:
    """vLLM's `prompt_logprobs` of a choice, when asked: per prompt token None (the first) or
    {token id: {"logprob", "rank" (1 = most likely; None for the prompt's own token outside
    the top k), "decoded_token"}}: the prompt's own token and the top `prompt_logprobs`."""
    k = req.prompt_logprobs
    if k is None or out.prompt_logprobs is None:
        return {}
    rows = []
    for token, entry in zip(out.prompt_token_ids, out.prompt_logprobs):
        if entry is None:
            rows.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        rank = {t: r for r, (t, _) in enumerate(ranked, start=1)}
        keep = {t for t, _ in ranked[:k]} | {token}
        rows.append(
            {
                str(t): {
                    "logprob": lp,
                    "rank": rank[t] if (t != token or rank[t] <= k) else None,
                    "decoded_token": tok.decode([t], skip_special_tokens=False),
                }
                for t, lp in entry.items()
                if t in keep
            }
        )
    return {"prompt_logprobs": rows}


def _completion_logprobs(token_ids, logprobs, tok, req, prompt=None) -> dict | None:
    """OpenAI's legacy logprobs object; `prompt` (ids, entries) puts the echoed prompt's
    tokens first (the first token's logprob is null: nothing precedes it)."""
    if req.logprobs is None or (logprobs is None and prompt is None):
        return None
    if prompt is not None:
        token_ids = list(prompt[0]) + list(token_ids)
        logprobs = list(prompt[1]) + list(logprobs or [None] * (len(token_ids) - len(prompt[0])))
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for token, entry in zip(token_ids, logprobs):
        text = tok.decode([token], skip_special_tokens=False)
        tokens.append(text)
        token_lps.append(entry.get(token) if entry else None)
        tops.append(
            {
                tok.decode([t], skip_special_tokens=False): lp
                for t, lp in _top(entry, token, req.logprobs)
            }
            if entry
            else None
        )
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _chat_logprobs(token_ids, logprobs, tok, req) -> dict | None:
    if not req.logprobs or logprobs is None:
        return None
    n = req.top_logprobs or 0

    def item(token: int, lp: float) -> dict:
        text = tok.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = []
    for token, entry in zip(token_ids, logprobs):
        if entry is None:
            continue
        content.append(
            {
                **item(token, entry.get(token)),
                "top_logprobs": [item(t, lp) for t, lp in _top(entry, token, n)],
            }
        )
    return {"content": content}


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
