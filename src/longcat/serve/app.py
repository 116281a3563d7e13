"""The HTTP server: FastAPI routes over a `Scheduler` stepping in one background thread.

Handlers are async and never touch the model: they check a request, submit its prompts to the
scheduler (thread-safe), and read the outputs the engine thread hands over through an asyncio
queue (`loop.call_soon_threadsafe`). A streaming client that goes away cancels its requests (the
stream's generator is closed), and the scheduler frees their rows at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.sampling import GenerationError, SamplingParams
from ..infer.scheduler import QueueFull, RequestOutput, Scheduler
from ..telemetry import Telemetry
from .metrics import ServerMetrics
from .protocol import (APIError, ChatRequest, CompletionRequest, Sampling, context_error, error_body,
                       longcat_chat_prompt, parse_chat, parse_completion)

DEFAULT_MAX_BODY_BYTES = 4 << 20
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    chat_template: str | None = None  # a Jinja template from the tokenizer config; None = LongCat's format


class ChatTemplate:
    """The tokenizer config's Jinja chat template, rendered in a sandbox."""

    def __init__(self, source: str, tokenizer) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(source)
        self.tokenizer = tokenizer

    def render(self, messages: list[dict]) -> str:
        tok = self.tokenizer
        special = {name: tok.id_to_token(getattr(tok, f"{name}_id")) for name in ("bos", "eos")}
        return self.template.render(messages=messages, add_generation_prompt=True,
                                    bos_token=special["bos"] or "", eos_token=special["eos"] or "")


def read_chat_template(folders: list[Path]) -> str | None:
    """`chat_template` of the first tokenizer_config.json (or chat_template.jinja) in folders."""
    for folder in folders:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        config = folder / "tokenizer_config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except ValueError:
                continue
            template = data.get("chat_template") if isinstance(data, dict) else None
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if isinstance(template, str):
                return template
    return None


class Server:
    """The scheduler, its engine thread, and what the routes share."""

    def __init__(self, scheduler: Scheduler, settings: ServerSettings) -> None:
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.tokenizer = self.engine.tokenizer
        self.settings = settings
        self.max_model_len = scheduler.max_model_len
        self.vocab_size = self.engine.config.vocab_size
        self.telemetry = Telemetry(self.engine.device, interval_s=1.0)
        self.metrics = ServerMetrics(scheduler, self.telemetry)
        self.template = ChatTemplate(settings.chat_template, self.tokenizer) \
            if settings.chat_template and self.tokenizer is not None else None
        self.created = int(time.time())
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.telemetry.start()
        self.thread = threading.Thread(target=self.scheduler.run, name="longcat-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.scheduler.stop()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.telemetry.stop()

    @property
    def healthy(self) -> bool:
        return self.scheduler.alive and self.thread is not None and self.thread.is_alive()

    # --- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so text prompts cannot be encoded; send token ids",
                           param)
        return self.engine.encode(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so chat messages cannot be encoded", "messages")
        if self.template is None:
            return self.engine.encode(longcat_chat_prompt(messages))
        try:
            text = self.template.render(messages)
        except Exception as exc:  # a template error is the template's, reported to the client
            raise APIError(400, f"the model's chat template failed on these messages: {exc}", "messages") from exc
        return list(self.tokenizer.encode(text, allow_special=True))

    def params(self, s: Sampling, prompt_len: int, chat: bool, choice: int) -> SamplingParams:
        max_tokens = s.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len if chat else COMPLETION_DEFAULT_MAX_TOKENS
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty (0 tokens); give at least one token",
                           "messages" if chat else "prompt")
        if max_tokens < 1 or prompt_len + max_tokens > self.max_model_len:
            raise context_error(prompt_len, max(max_tokens, 1), self.max_model_len, chat)
        bad = [t for t in s.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}",
                           "stop_token_ids")
        if s.stop and self.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer, and this model has none; use stop_token_ids", "stop")
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                top_k=min(s.top_k, self.vocab_size), min_p=s.min_p,  # k beyond the vocabulary: no filter
                repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty, seed=None if s.seed is None else s.seed + choice,
                stop=s.stop, stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos, logprobs=s.logprobs)
        except GenerationError as exc:
            raise APIError(400, str(exc)) from exc

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)


class _Choices:
    """The requests of one HTTP call (prompts x n) and the queue their outputs arrive on."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.requests = []
        self.prompt_tokens = 0

    def submit(self, jobs: list[tuple[list[int], list[SamplingParams]]]) -> None:
        """jobs: (prompt ids, the SamplingParams of each of its n choices); choice j of prompt i has
        index i * n + j. A prompt's choices go in together and share its prefill."""
        metrics = self.server.metrics

        def deliver(index: int):
            def on_event(out: RequestOutput) -> None:
                metrics.observe(out)
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
            return on_event

        try:
            for ids, params in jobs:
                first = len(self.requests)
                callbacks = [deliver(first + j) for j in range(len(params))]
                self.requests += self.server.scheduler.submit_choices(ids, params, callbacks)
        except QueueFull as exc:
            self.cancel()
            raise APIError(429, str(exc)) from exc
        except GenerationError as exc:
            self.cancel()
            if not self.server.scheduler.alive:
                raise APIError(503, f"the engine has stopped: {self.server.scheduler.error}") from exc
            raise APIError(400, str(exc)) from exc

    def cancel(self) -> None:
        for r in self.requests:
            if not r.done:
                self.server.scheduler.cancel(r)

    async def outputs(self):
        """(choice index, output) until every choice has finished."""
        remaining = len(self.requests)
        while remaining:
            index, out = await self.queue.get()
            if out.finished:
                remaining -= 1
            yield index, out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if server.thread is None:
            server.start()
        yield
        server.stop()

    app = FastAPI(title="longcat serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    def check_key(request: Request) -> None:
        key = server.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not secrets.compare_digest(given[7:].encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key the server was started with (--api-key)")

    async def read_json(request: Request) -> dict:
        limit = server.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body has {int(length)} bytes; at most {limit} are accepted")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def check_model(name: str | None) -> None:
        if name is not None and name != server.settings.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"'{server.settings.model_name}' (GET /v1/models)", "model")

    def check_alive() -> None:
        if not server.scheduler.alive:
            raise APIError(503, f"the engine has stopped: {server.scheduler.error}")

    # --- routes ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return Response(status_code=200 if server.healthy else 503)

    @app.get("/version")
    async def version():
        from .. import __version__

        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{
            "id": server.settings.model_name, "object": "model", "created": server.created, "owned_by": "longcat",
            "max_model_len": server.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        check_model(body.get("model") if isinstance(body.get("model"), str) else None)
        if isinstance(body.get("messages"), list):
            ids = server.chat_ids(parse_chat({"messages": body["messages"]}, server.max_model_len).messages)
        elif isinstance(body.get("prompt"), str):
            ids = server.encode(body["prompt"], "prompt")
        else:
            raise APIError(400, "give prompt (a string) or messages (a chat)", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "tokens must be a list of token ids", "tokens")
        bad = [t for t in ids if not 0 <= t < server.vocab_size]
        if bad:
            raise APIError(400, f"token ids outside the vocabulary [0, {server.vocab_size}): {bad[:5]}", "tokens")
        if server.tokenizer is None:
            raise APIError(400, "this model has no tokenizer to decode with", "tokens")
        return {"prompt": server.tokenizer.decode(ids)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await read_json(request)
        parsed = parse_completion(body, server.max_model_len, server.vocab_size)
        check_model(parsed.model)
        check_alive()
        prompts = [server.encode(p, "prompt") for p in parsed.prompts]
        return await _run(request, parsed, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json(request)
        parsed = parse_chat(body, server.max_model_len)
        check_model(parsed.model)
        check_alive()
        return await _run(request, parsed, [server.chat_ids(parsed.messages)], chat=True)

    async def _run(request: Request, parsed: CompletionRequest | ChatRequest, prompts: list[list[int]], chat: bool):
        s = parsed.sampling
        jobs = [(ids, [server.params(s, len(ids), chat, j) for j in range(s.n)]) for ids in prompts]
        choices = _Choices(server)
        choices.prompt_tokens = sum(len(ids) for ids in prompts)
        choices.submit(jobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if s.stream:
            return StreamingResponse(_stream(choices, rid, chat, s), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(request, choices, rid, chat)

    async def _complete(request: Request, choices: _Choices, rid: str, chat: bool):
        finals: dict[int, RequestOutput] = {}
        logprobs: dict[int, list] = {i: [] for i in range(len(choices.requests))}
        try:
            while len(finals) < len(choices.requests):
                try:  # a timeout now and then, to notice a client that went away
                    index, out = await asyncio.wait_for(choices.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        choices.cancel()
                        return Response(status_code=499)
                    continue
                if out.logprobs:
                    logprobs[index].extend(out.logprobs)
                if out.finished:
                    finals[index] = out
        except asyncio.CancelledError:
            choices.cancel()
            raise
        errors = [o.error for o in finals.values() if o.error]
        if errors:
            raise APIError(503, f"the engine failed while generating: {errors[0]}")
        now = int(time.time())
        out_choices, completion_tokens = [], 0
        for i in range(len(choices.requests)):
            r = finals[i].result
            completion_tokens += len(r.token_ids)
            lp = _logprobs(server, logprobs[i], chat) if choices.requests[i].seq.params.logprobs is not None else None
            choice = {"index": i, "logprobs": lp, "finish_reason": r.finish_reason,
                      "stop_reason": r.stop_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": r.text}
            else:
                choice["text"] = r.text
            out_choices.append(choice)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                "model": server.settings.model_name, "choices": out_choices,
                "usage": _usage(choices.prompt_tokens, completion_tokens)}

    async def _stream(choices: _Choices, rid: str, chat: bool, s: Sampling):
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        completion_tokens = 0
        wants_logprobs = s.logprobs is not None

        def frame(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(choice_list: list, usage: dict | None = None) -> str:
            payload = {"id": rid, "object": kind, "created": created, "model": server.settings.model_name,
                       "choices": choice_list}
            if usage is not None:
                payload["usage"] = usage
            return frame(payload)

        finished = False
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(choices.requests))])
            async for index, out in choices.outputs():
                if out.error is not None:
                    yield frame(error_body(503, f"the engine failed while generating: {out.error}"))
                    continue
                completion_tokens += len(out.token_ids)
                finish = out.result.finish_reason if out.result is not None else None
                if not out.text and not finish and not (wants_logprobs and out.token_ids):
                    continue  # nothing to show yet (text held back for a possible stop string)
                lp = _logprobs(server, out.logprobs or [], chat) if wants_logprobs else None
                if chat:
                    choice = {"index": index, "delta": {"content": out.text} if out.text else {}, "logprobs": lp,
                              "finish_reason": finish}
                else:
                    choice = {"index": index, "text": out.text, "logprobs": lp, "finish_reason": finish}
                if finish:
                    choice["stop_reason"] = out.result.stop_reason
                yield chunk([choice])
            if s.include_usage:
                yield chunk([], _usage(choices.prompt_tokens, completion_tokens))
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                choices.cancel()  # the client went away (or the server is stopping)

    return app


def _logprobs(server: Server, items: list, chat: bool):
    """OpenAI's logprobs objects: chat `{"content": [{token, logprob, bytes, top_logprobs}]}`,
    completions `{tokens, token_logprobs, top_logprobs, text_offset}`."""
    if chat:
        content = []
        for lp in items:
            text = server.token_text(lp.token_id)
            content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
                            "top_logprobs": [{"token": (t := server.token_text(i)), "logprob": v,
                                              "bytes": list(t.encode("utf-8"))} for i, v in lp.top]})
        return {"content": content}
    tokens = [server.token_text(lp.token_id) for lp in items]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    tops = []
    for lp in items:
        top: dict[str, float] = {}
        for i, v in lp.top:  # best first; tokens that decode alike keep the likeliest one's value
            top.setdefault(server.token_text(i), v)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items], "top_logprobs": tops,
            "text_offset": offsets}


__all__ = ["Server", "ServerSettings", "create_app", "read_chat_template"]
