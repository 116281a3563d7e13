"""The OpenAI request bodies we accept, checked field by field, and the error envelope.

Every check names the parameter and the allowed range, so a client sees what to fix:
`{"error": {"message": ..., "type": ..., "param": ..., "code": <HTTP status>}}`. Unknown fields
are ignored (clients send vendor extensions); known fields of the wrong type or out of range are a
400. Parameters we do not implement (`echo`, `suffix`, `logit_bias`, `best_of` > n, tools) are
refused rather than silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's cap for chat)
MAX_STOP = 16  # stop strings per request
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error for the client: HTTP status, message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


@dataclass
class Sampling:
    """The sampling fields common to /v1/completions and /v1/chat/completions."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # alternatives per token; None = no logprobs
    stream: bool = False
    include_usage: bool = False


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    sampling: Sampling


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    sampling: Sampling


# --- field checks ----------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _bad(name: str, rule: str, value) -> APIError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return APIError(400, f"{name} {rule}, got {shown}", name)


def _number(body: dict, name: str, default, low: float, high: float, *, low_open=False, high_open=False):
    v = body.get(name)
    if v is None:
        return default
    ok = _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise _bad(name, f"must be a number in {lo}{low}, {high}{hi}", v)
    return float(v)


def _integer(body: dict, name: str, default, low: int, high: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < low or (high is not None and v > high):
        rule = f"must be an integer >= {low}" if high is None else f"must be an integer in [{low}, {high}]"
        raise _bad(name, rule, v)
    return v


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "must be true or false", v)
    return v


def _refuse(body: dict, name: str, allowed, why: str) -> None:
    v = body.get(name)
    if v is not None and v != allowed and v not in ({}, [], False):
        raise APIError(400, f"{name} is not supported by this server ({why}); leave it out", name)


def parse_sampling(body: dict, *, chat: bool, max_model_len: int) -> Sampling:
    s = Sampling()
    if chat and body.get("max_completion_tokens") is not None:
        s.max_tokens = _integer(body, "max_completion_tokens", None, 1, None)
    else:
        s.max_tokens = _integer(body, "max_tokens", None, 1, None)  # beyond the context: checked with the prompt
    s.temperature = _number(body, "temperature", 1.0, 0, 2)
    s.top_p = _number(body, "top_p", 1.0, 0, 1, low_open=True)
    top_k = _integer(body, "top_k", 0, -1)
    s.top_k = 0 if top_k == -1 else top_k
    s.min_p = _number(body, "min_p", 0.0, 0, 1, high_open=True)
    s.presence_penalty = _number(body, "presence_penalty", 0.0, -2, 2)
    s.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2, 2)
    s.repetition_penalty = _number(body, "repetition_penalty", 1.0, 0, 2, low_open=True)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**63):
        raise _bad("seed", "must be a 64-bit integer", seed)
    s.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(x, str) and x for x in stop):
            raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} non-empty strings", stop)
        s.stop = stop
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            raise _bad("stop_token_ids", "must be a list of token ids (integers >= 0)", ids)
        s.stop_token_ids = ids
    s.ignore_eos = _boolean(body, "ignore_eos")
    s.n = _integer(body, "n", 1, 1, MAX_N)
    best_of = _integer(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != s.n:
        raise APIError(400, "best_of other than n is not supported by this server; leave it out", "best_of")
    if chat:
        wants = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not wants:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        s.logprobs = (top or 0) if wants else None
    else:
        s.logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    s.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", "must be an object such as {\"include_usage\": true}", options)
        if not s.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        s.include_usage = _boolean(options, "include_usage")
    _refuse(body, "logit_bias", None, "no logit biases")
    _refuse(body, "echo", False, "the prompt is not echoed")
    _refuse(body, "suffix", None, "no insertion")
    _refuse(body, "tools", None, "no tool calls")
    _refuse(body, "response_format", {"type": "text"}, "plain text only")
    return s


def _model(body: dict):
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string", model)
    return model


def parse_completion(body: dict, max_model_len: int, vocab_size: int) -> CompletionRequest:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "prompt is required (a string, a list of strings, or token ids)", "prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p)
                                                     for p in prompt):
        prompts = list(prompt)
    else:
        raise _bad("prompt", "must be a string, a non-empty list of strings, a list of token ids or a list of "
                             "token-id lists", prompt)
    if len(prompts) > MAX_N:
        raise APIError(400, f"at most {MAX_N} prompts per request, got {len(prompts)}", "prompt")
    for p in prompts:
        if isinstance(p, list):
            if not p:
                raise APIError(400, "a token-id prompt is empty; give at least one token", "prompt")
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}",
                               "prompt")
    sampling = parse_sampling(body, chat=False, max_model_len=max_model_len)
    if len(prompts) * sampling.n > MAX_N:
        raise APIError(400, f"prompts x n must be at most {MAX_N}, got {len(prompts)} x {sampling.n}", "n")
    return CompletionRequest(_model(body), prompts, sampling)


def parse_chat(body: dict, max_model_len: int) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects", messages)
    checked = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object with role and content", m)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)}", role)
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content", "parts must be {\"type\": \"text\", \"text\": ...} (text only)",
                               part)
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", "must be a string or a list of text parts", content)
        checked.append({"role": role, "content": content})
    sampling = parse_sampling(body, chat=True, max_model_len=max_model_len)
    return ChatRequest(_model(body), checked, sampling)


def context_error(prompt_tokens: int, max_tokens: int, max_model_len: int, chat: bool) -> APIError:
    where = "messages" if chat else "prompt"
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {where}, {max_tokens} in the completion). "
        f"Please reduce the length of the {where} or completion.",
        "messages" if chat else "prompt",
    )


def longcat_chat_prompt(messages: list[dict]) -> str:
    """LongCat-Flash-Chat's own format: `SYSTEM:{system} [Round 0] USER:{q} ASSISTANT:`; a finished
    assistant turn ends with `</longcat_s>`, then ` [Round N] USER:...`."""
    system = "".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    text = f"SYSTEM:{system}" if system else ""
    round_ = 0
    for m in messages:
        if m["role"] in ("user", "tool"):
            text += f"{' ' if text else ''}[Round {round_}] USER:{m['content']}"
        elif m["role"] == "assistant":
            text += f" ASSISTANT:{m['content']}</longcat_s>"
            round_ += 1
    return text + " ASSISTANT:"


__all__ = ["APIError", "error_body", "Sampling", "CompletionRequest", "ChatRequest", "parse_completion",
           "parse_chat", "context_error", "longcat_chat_prompt"]
