"""The FastAPI app: `/v1/chat/completions` and `/v1/completions` (OpenAI-compatible, streaming or not, with
logprobs), `/v1/models`, `/health`, and the web chat page at `/` (plain HTML/JS/CSS from serve/web, no build step,
no CDN). Requests and responses are the typed models of serve/protocol.py. Where several LoRA adapters share the
base (serve/adapters.py), a request's `model` picks one; /v1/models lists them all."""

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
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers

from chattune.sampling import StopStrings, sampling_settings
from chattune.serve.adapters import Served, served_alone
from chattune.serve.convert import PlainPrompt, chat_tools, plain_prompts, prompt_prefix, to_conversation
from chattune.serve.logprobs import TokenText, answer_scores, chat_logprobs, completion_logprobs, offsets
from chattune.serve.protocol import (ApiError, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                     ChatCompletionRequest, ChatDelta, ChatMessage, Completion, CompletionChoice,
                                     CompletionRequest, FunctionCall, ModelCard, ModelList, ToolCall, Usage, parse)
from chattune.serve.stream import StreamText
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
               max_batch: int = 8, decode_step: str = "auto", bind_host: str | None = None,
               models: list[Served] | None = None, prompt_cache_mb: int = 256):
    """The server. `models` (serve/adapters.py `add_loras`): the models requests may name where several adapters
    share `tuned`'s base, the first what a request without `model` gets; None: `tuned` alone.
    `bind_host` (what `chattune serve --host` binds): without an API key and bound to this machine
    only, requests must name a loopback host (`Host`), which stops DNS rebinding; without a key, a browser request
    from another site (an `Origin` that is not this server's) is refused, so a web page the user visits cannot
    drive the local model."""
    app = FastAPI(title="chattune serve", docs_url=None, redoc_url=None)
    local_only = bind_host is not None and bind_host in LOOPBACK
    # One thread renders and tokenizes prompts off the event loop: one, not asyncio's pool of several, because each
    # new thread brings its own malloc arena (tens of MiB resident under load) and rendering is quick
    render_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chattune-render")

    def refusal(headers) -> JSONResponse | None:
        """The 403 for a request this server without an API key must not answer (see the docstring), or None."""
        if api_key is not None:
            return None
        host = headers.get("host", "")
        if local_only and _host_name(host) not in LOOPBACK:
            return JSONResponse(ApiError(403, f"Host {host!r} is not this machine: this server, bound to "
                                              f"{bind_host} without an API key, answers only requests for "
                                              "localhost (DNS rebinding protection); set --api-key to serve "
                                              "other names", kind="permission_error").body(), status_code=403)
        origin = headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1].rstrip("/") != host:
            return JSONResponse(ApiError(403, f"a web page from {origin} may not use this server (it has no API "
                                              "key, so only its own page may call it); set --api-key to allow "
                                              "other sites", kind="permission_error").body(), status_code=403)
        return None

    class SameSiteOnly:
        """`refusal` as a plain ASGI middleware. Why not `@app.middleware("http")`: starlette's BaseHTTPMiddleware
        relays every chunk of a streamed answer through a memory stream and a second task, a cost paid per token."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                refused = refusal(Headers(scope=scope))
                if refused is not None:
                    await refused(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(SameSiteOnly)
    served = models or served_alone(model_name(tuned), tuned)
    by_id = {m.id: m for m in served}
    several = len(served) > 1
    worker = Worker(tuned, max_queue, max_batch, decode_step, adapters=[m.adapter for m in served] if several else None,
                    prompt_cache_mb=prompt_cache_mb)
    name = served[0].id
    ctx = context_length(tuned.model)
    app.state.worker = worker
    tokenizer = tuned.tokenizer
    texts = TokenText(tokenizer)
    prefix = prompt_prefix(tokenizer)
    vocab = tuned.model.get_input_embeddings().num_embeddings

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
        return {"status": "ok", "model": name, "models": list(by_id), "queued": worker.waiting,
                "busy": worker.busy.is_set(), "batching": worker.batching, "largest_batch": worker.largest_batch,
                "decode_step": worker.decode_step, "prompt_cache": worker.prompt_cache_stats()}

    @app.get("/v1/models")
    async def model_list(request: Request):
        check_key(request)
        return respond(ModelList(data=[ModelCard(id=m.id, template=m.tuned.info.get("template") or "auto",
                                                 method=m.tuned.info.get("method"), parent=m.parent)
                                       for m in served]))

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

    def pick(asked: str | None) -> Served:
        """The model a request names (`model`; without one, the server's own); 404 for another name, as vLLM."""
        if asked is None:
            return served[0]
        if asked not in by_id:
            serving = ", ".join(repr(i) for i in by_id)
            raise ApiError(404, f"model {asked!r} does not exist here; this server serves {serving}", "model",
                           "model_not_found", kind="not_found_error")
        return by_id[asked]

    def new_job(m: Served, prompt: list[int], max_new: int, req, **kw) -> Job:
        """A request's job, with its model's adapter and stop tokens where several are served."""
        return Job(prompt, max_new, settings(req), req.stops, asyncio.get_running_loop(), adapter=m.adapter,
                   stop_ids=m.tuned.stop_ids if several else None, **kw)

    async def off_the_loop(fn, *args):
        """Rendering and tokenizing a long prompt must not hold up the other requests' streams."""
        return await asyncio.get_running_loop().run_in_executor(render_pool, fn, *args)

    def budget(prompt_length: int, asked: int | None, param: str) -> int:
        """The answer's token budget: the request's `max_tokens`, else the server's default, within the model's
        context (0: an echoed prompt only)."""
        if ctx is None:
            return default_max_tokens if asked is None else asked
        if prompt_length > ctx or (prompt_length == ctx and asked != 0):
            raise ApiError(400, f"the prompt is {prompt_length} tokens; this model's context is {ctx} tokens", param,
                           "context_length_exceeded")
        if asked and prompt_length + asked > ctx:
            raise ApiError(400, f"the prompt ({prompt_length} tokens) plus max_tokens ({asked}) exceeds this model's "
                                f"context of {ctx} tokens", "max_tokens", "context_length_exceeded")
        return min(default_max_tokens if asked is None else asked, ctx - prompt_length)

    def settings(req):
        return sampling_settings(getattr(tuned.model, "generation_config", None), req.temperature, req.top_p,
                                 req.seed, req.min_p, req.presence_penalty, req.frequency_penalty)

    def submit(jobs: list[Job]) -> None:
        for i, job in enumerate(jobs):
            try:
                worker.submit(job)
            except queue.Full:
                for queued in jobs[:i]:  # a request is queued whole or not at all
                    queued.cancel.set()
                raise ApiError(503, f"the server is busy ({worker.max_queue} requests waiting); retry shortly",
                               code="queue_full", kind="server_error", headers={"Retry-After": "1"}) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = parse(ChatCompletionRequest, await read_json(request))
        m = pick(req.model)
        tools = chat_tools(req)
        conv = to_conversation(req.messages, tools)
        try:
            prompt = await off_the_loop(m.tuned.prompt_ids, conv)
        except Exception as e:  # noqa: BLE001 - a template that cannot render this conversation
            raise ApiError(400, f"these messages cannot be rendered with the model's template: {e}", "messages") from None
        one = new_job(m, prompt, budget(len(prompt), req.answer_tokens, "messages"), req,
                      logprobs=req.logprob_alternatives)
        submit([one])
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_chat_stream(one, rid, created, req, tools, m), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        (value,) = await _results([one], request)
        return respond(chat_completion(value, rid, created, req, tools, m))

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = parse(CompletionRequest, await read_json(request))
        m = pick(req.model)
        if len(req.prompts) > worker.max_queue:
            raise ApiError(400, f"{len(req.prompts)} prompts in one request; this server queues at most "
                                f"{worker.max_queue} (--max-queue)", "prompt")
        try:
            prompts = await off_the_loop(plain_prompts, req.prompts, tokenizer, prefix, vocab)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - text this tokenizer cannot encode
            raise ApiError(400, f"the prompt cannot be tokenized: {e}", "prompt") from None
        jobs = [new_job(m, p.ids, budget(len(p.ids), req.max_tokens, "prompt"), req, logprobs=req.logprobs,
                    prompt_logprobs=req.logprobs if req.echo else None) for p in prompts]
        submit(jobs)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_completion_stream(jobs[0], prompts[0], rid, created, req, m.id),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _results(jobs, request)
        return respond(Completion(id=rid, created=created, model=m.id,
                                  choices=[completion_choice(i, p, r, req) for i, (p, r) in
                                           enumerate(zip(prompts, results))],
                                  usage=usage(*results)))

    def finish(result: dict, tools, text: str, stopped_by_string: bool, m: Served) -> tuple[str, list[ToolCall], str]:
        content, calls = (m.tuned.template.parse_assistant(text) if tools else (text, []))
        if calls:
            return content, [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(
                name=c["name"], arguments=c["arguments"] if isinstance(c["arguments"], str)
                else json.dumps(c["arguments"], ensure_ascii=False))) for c in calls], "tool_calls"
        return content, [], "stop" if (result["stopped"] or stopped_by_string) else "length"

    def usage(*results: dict) -> Usage:
        prompt, answer = sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results)
        return Usage(prompt_tokens=prompt, completion_tokens=answer, total_tokens=prompt + answer)

    def chat_completion(value: dict, rid: str, created: int, req: ChatCompletionRequest, tools,
                        m: Served) -> ChatCompletion:
        text, by_string = StopStrings(req.stops).cut(value["text"])
        content, calls, reason = finish(value, tools, text, by_string, m)
        message = ChatMessage(content=content if content or not calls else None, tool_calls=calls or None)
        logprobs = None
        if req.logprobs:
            logprobs = chat_logprobs(texts, answer_scores(tokenizer, value, len(text), by_string)[0])
        return ChatCompletion(id=rid, created=created, model=m.id, usage=usage(value),
                              choices=[ChatChoice(message=message, finish_reason=reason, logprobs=logprobs)])

    def completion_choice(index: int, prompt: PlainPrompt, value: dict, req: CompletionRequest) -> CompletionChoice:
        text, by_string = StopStrings(req.stops).cut(value["text"])
        echo = prompt.text if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            scores, starts = answer_scores(tokenizer, value, len(text), by_string)
            if req.echo:
                scores = value["prompt_logprobs"] + scores
                starts = offsets(tokenizer, prompt.ids, prompt.skip_special) + [len(echo) + s for s in starts]
            logprobs = completion_logprobs(texts, scores, starts)
        return CompletionChoice(index=index, text=echo + text, logprobs=logprobs,
                                finish_reason="stop" if value["stopped"] or by_string else "length")

    async def _wait(job: Job):
        kind, value = await job.events.get()
        if kind == "error":
            raise ApiError(500, f"generation failed: {value}", kind="server_error")
        return kind, value

    async def _results(jobs: list[Job], request: Request) -> list[dict]:
        """Each job's final result; a client that goes away cancels its generations."""
        async def watch():
            while not all(job.cancel.is_set() for job in jobs):
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.1)
            for job in jobs:
                job.cancel.set()

        async def done(job: Job) -> dict:
            while True:
                kind, value = await _wait(job)
                if kind == "done":
                    return value

        watcher = asyncio.create_task(watch())
        try:
            return [await done(job) for job in jobs]
        except BaseException:
            for job in jobs:  # one prompt failed: the others' answers are not wanted any more
                job.cancel.set()
            raise
        finally:
            watcher.cancel()

    def sse(data) -> str:
        return f"data: {data.model_dump_json()}\n\n"

    async def _chat_stream(job: Job, rid: str, created: int, req: ChatCompletionRequest, tools, m: Served):
        def chunk(delta: ChatDelta, reason=None, end: Usage | None = None, scores=()) -> str:
            logprobs = chat_logprobs(texts, [s for s, _ in scores]) if scores else None
            return sse(ChatCompletionChunk(id=rid, created=created, model=m.id, usage=end, choices=[
                ChatChunkChoice(delta=delta, finish_reason=reason, logprobs=logprobs)]))

        feed = StreamText(req.stops, tokenizer, req.logprobs)
        try:
            yield chunk(ChatDelta(role="assistant", content=""))
            while True:
                kind, value = await _wait(job)
                if kind == "done":
                    break
                feed.add(kind, value)
                if tools:  # a tool call is only known at the end: send everything then
                    continue
                delta, scores = feed.ready()
                if delta:
                    yield chunk(ChatDelta(content=delta), scores=scores)
            text, by_string = feed.stops.cut(value["text"])
            content, calls, reason = finish(value, tools, text, by_string, m)
            scores = feed.finish(value, text, by_string)
            if calls:
                if content:
                    yield chunk(ChatDelta(content=content), scores=scores)
                    scores = []
                yield chunk(ChatDelta(tool_calls=[c.model_copy(update={"index": i}) for i, c in enumerate(calls)]),
                            scores=scores)
            elif content[len(feed.sent):] or scores:
                yield chunk(ChatDelta(content=content[len(feed.sent):]), scores=scores)
            yield chunk(ChatDelta(), reason, usage(value))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a disconnect (or the end) stops the generation at the next token

    async def _completion_stream(job: Job, prompt: PlainPrompt, rid: str, created: int, req: CompletionRequest,
                                 model: str):
        echo = prompt.text if req.echo else ""

        def chunk(text: str, scores=(), starts=(), reason=None, end: Usage | None = None) -> str:
            wanted = req.logprobs is not None and reason is None  # (the last chunk carries no tokens)
            logprobs = completion_logprobs(texts, list(scores), list(starts)) if wanted else None
            return sse(Completion(id=rid, created=created, model=model, usage=end, choices=[
                CompletionChoice(index=0, text=text, logprobs=logprobs, finish_reason=reason)]))

        def answer(pairs) -> tuple[list, list[int]]:
            return [s for s, _ in pairs], [len(echo) + start for _, start in pairs]

        feed = StreamText(req.stops, tokenizer, req.logprobs is not None)
        try:
            if echo and req.logprobs is None:
                yield chunk(echo)
            while True:
                kind, value = await _wait(job)
                if kind == "done":
                    break
                if kind == "prompt" and echo:  # the echoed prompt goes first, with its tokens' logprobs
                    yield chunk(echo, value, offsets(tokenizer, prompt.ids, prompt.skip_special))
                    continue
                feed.add(kind, value)
                delta, pairs = feed.ready()
                if delta:
                    yield chunk(delta, *answer(pairs))
            text, by_string = feed.stops.cut(value["text"])
            pairs = feed.finish(value, text, by_string)
            if text[len(feed.sent):] or pairs:
                yield chunk(text[len(feed.sent):], *answer(pairs))
            yield chunk("", reason="stop" if value["stopped"] or by_string else "length", end=usage(value))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()

    return app


def respond(model) -> Response:
    """A response model as JSON (pydantic writes it: -inf-free floats, UTF-8 text)."""
    return Response(model.model_dump_json(), media_type="application/json")
