"""The FastAPI app: `/v1/chat/completions` (OpenAI-compatible, streaming or not), `/v1/models`, `/health`, and
the web chat page at `/` (plain HTML/JS/CSS from serve/web, no build step, no CDN)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import queue
import time
import uuid
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from chattune.sampling import StopStrings, sampling_settings
from chattune.serve.convert import ApiError, parse_params, to_conversation
from chattune.serve.worker import Job, Worker

WEB = Path(str(files("chattune") / "serve" / "web"))


def model_name(tuned) -> str:
    return Path(tuned.source).name or "model"


def context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


MAX_BODY = 4 * 2**20  # bytes of one request body: far above any chat a model's context holds
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _host_name(value: str) -> str:
    """The host of a `Host` header or an origin's authority, without its port (IPv6 keeps its brackets)."""
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def create_app(tuned, api_key: str | None = None, max_queue: int = 16, default_max_tokens: int = 512,
               max_batch: int = 8, decode_step: str = "auto", bind_host: str | None = None):
    """The server. `bind_host` (what `chattune serve --host` binds): without an API key and bound to this machine
    only, requests must name a loopback host (`Host`), which stops DNS rebinding; without a key, a browser request
    from another site (an `Origin` that is not this server's) is refused, so a web page the user visits cannot
    drive the local model."""
    app = FastAPI(title="chattune serve", docs_url=None, redoc_url=None)
    local_only = bind_host is not None and bind_host in LOOPBACK
    # One thread renders and tokenizes prompts off the event loop: one, not asyncio's pool of several, because each
    # new thread brings its own malloc arena (tens of MiB resident under load) and rendering is quick
    render_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chattune-render")

    @app.middleware("http")
    async def same_site_only(request: Request, call_next):
        if api_key is None:
            host = request.headers.get("host", "")
            if local_only and _host_name(host) not in LOOPBACK:
                return JSONResponse(ApiError(403, f"Host {host!r} is not this machine: this server, bound to "
                                                  f"{bind_host} without an API key, answers only requests for "
                                                  "localhost (DNS rebinding protection); set --api-key to serve "
                                                  "other names", kind="permission_error").body(), status_code=403)
            origin = request.headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1].rstrip("/") != host:
                return JSONResponse(ApiError(403, f"a web page from {origin} may not use this server (it has no API "
                                                  "key, so only its own page may call it); set --api-key to allow "
                                                  "other sites", kind="permission_error").body(), status_code=403)
        return await call_next(request)
    worker = Worker(tuned, max_queue, max_batch, decode_step)
    name = model_name(tuned)
    ctx = context_length(tuned.model)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(ApiError(400, f"invalid request: {e.errors()[0].get('msg', e)}").body(), status_code=400)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key",
                           kind="authentication_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "queued": worker.waiting, "busy": worker.busy.is_set(),
                "batching": worker.batching, "largest_batch": worker.largest_batch,
                "decode_step": worker.decode_step}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "chattune",
                                            "template": tuned.info.get("template") or "auto",
                                            "method": tuned.info.get("method")}]}

    @app.get("/")
    async def page():
        return FileResponse(WEB / "index.html")

    @app.get("/web/{asset}")
    async def asset(asset: str):
        path = WEB / asset
        if asset not in ("app.js", "style.css") or not path.is_file():
            raise ApiError(404, f"no such file: {asset}", kind="not_found_error")
        return FileResponse(path)

    async def read_json(request: Request):
        """The request's JSON body: a JSON content type, at most MAX_BODY bytes (read no further), valid JSON."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the body must be JSON sent as `Content-Type: application/json` (got {kind or 'none'!r})",
                           code="unsupported_media_type")
        too_big = ApiError(413, f"the request body is over {MAX_BODY // 2**20} MiB", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise too_big
        try:
            return json.loads(bytes(data))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # (deep nesting: RecursionError)
            raise ApiError(400, "the request body is not valid JSON") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        body = await read_json(request)
        params = parse_params(body)
        if params.model not in (None, name):
            raise ApiError(404, f"model {params.model!r} does not exist here; this server serves {name!r}", "model",
                           "model_not_found", kind="not_found_error")
        conv = to_conversation(body.get("messages") if isinstance(body, dict) else None, params.tools)
        try:  # rendering and tokenizing a long conversation must not hold up the other requests' streams
            prompt = await asyncio.get_running_loop().run_in_executor(render_pool, tuned.prompt_ids, conv)
        except Exception as e:  # noqa: BLE001 - a template that cannot render this conversation
            raise ApiError(400, f"these messages cannot be rendered with the model's template: {e}", "messages") from None
        max_tokens = params.max_tokens or default_max_tokens
        if ctx is not None:
            if len(prompt) >= ctx:
                raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is {ctx} tokens",
                               "messages", "context_length_exceeded")
            if params.max_tokens and len(prompt) + params.max_tokens > ctx:
                raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                                    f"this model's context of {ctx} tokens", "max_tokens", "context_length_exceeded")
            max_tokens = min(max_tokens, ctx - len(prompt))
        sampling = sampling_settings(getattr(tuned.model, "generation_config", None), params.temperature,
                                     params.top_p, params.seed, params.min_p, params.presence_penalty,
                                     params.frequency_penalty)
        job = Job(prompt, max_tokens, sampling, params.stop, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({worker.max_queue} requests waiting); retry shortly",
                           code="queue_full", kind="server_error", headers={"Retry-After": "1"}) from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if params.stream:
            return StreamingResponse(_stream(job, rid, created, params), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _complete(job, request, rid, created, params))

    def finish(result: dict, params, text: str, stopped_by_string: bool) -> tuple[str, list[dict], str]:
        content, calls = (tuned.template.parse_assistant(text) if params.tools else (text, []))
        if calls:
            tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                           "function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], str)
                                        else json.dumps(c["arguments"], ensure_ascii=False)}} for c in calls]
            return content, tool_calls, "tool_calls"
        return content, [], "stop" if (result["stopped"] or stopped_by_string) else "length"

    def usage(result: dict) -> dict:
        return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}

    async def _wait(job: Job):
        kind, value = await job.events.get()
        if kind == "error":
            raise ApiError(500, f"generation failed: {value}", kind="server_error")
        return kind, value

    async def _complete(job: Job, request: Request, rid: str, created: int, params) -> dict:
        async def watch():  # a client that goes away cancels its generation
            while not job.cancel.is_set():
                if await request.is_disconnected():
                    job.cancel.set()
                    return
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch())
        try:
            while True:
                kind, value = await _wait(job)
                if kind == "done":
                    break
        finally:
            watcher.cancel()
        text, by_string = StopStrings(params.stop).cut(value["text"])
        content, calls, reason = finish(value, params, text, by_string)
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = calls
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": message, "finish_reason": reason}], "usage": usage(value)}

    async def _stream(job: Job, rid: str, created: int, params):
        def chunk(delta: dict, reason=None, extra=None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **(extra or {})}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        stops = StopStrings(params.stop)
        sent = ""  # text already sent; with stop strings the tail that could start one is held back
        hold = max(stops.longest - 1, 0)
        try:
            yield chunk({"role": "assistant", "content": ""})
            buffered = ""
            while True:
                kind, value = await _wait(job)
                if kind == "done":
                    break
                buffered += value
                if params.tools:  # a tool call is only known at the end: send everything then
                    continue
                text, cut = stops.cut(buffered)
                ready = text if cut else text[: max(len(sent), len(text) - hold)]
                if len(ready) > len(sent):
                    yield chunk({"content": ready[len(sent):]})
                    sent = ready
            text, by_string = stops.cut(value["text"])
            content, calls, reason = finish(value, params, text, by_string)
            if calls:
                if content:
                    yield chunk({"content": content})
                yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
            elif content[len(sent):]:
                yield chunk({"content": content[len(sent):]})
            yield chunk({}, reason, {"usage": usage(value)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a disconnect (or the end) stops the generation at the next token

    return app
