"""OpenAI-compatible requests, checked at the edge: every field is validated here (types, finite numbers,
ranges that fit the types used downstream, valid Unicode, booleans that are booleans), so nothing a client
sends can fail inside a rank. A parameter moe_pd does not honour is a 400 that names it, never ignored.

Bodies are decoded with msgspec, which refuses NaN and Infinity, numbers out of float range, invalid UTF-8 and
lone surrogates; `decode_body` adds a nesting limit. Errors are OpenAI's shape: {"error": {"message", "type",
"param", "code"}}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from moe_pd.engine.core.request import MAX_LOGPROBS, SamplingParams, prompt_problem

MAX_DEPTH = 32
"""Deepest JSON nesting a body may have (a chat message's content parts are at depth 4)."""
MAX_CHOICES = 64
"""Most sequences one request may ask for (prompts x n)."""
MAX_STOP = 16
"""Most stop strings."""
_I64 = 2**63


class APIError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.kind, self.retry_after = status, param, kind, retry_after

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}


def unavailable(message: str, retry_after: float = 1.0, status: int = 503) -> APIError:
    return APIError(message, status, kind="server_error", retry_after=retry_after)


def decode_body(raw: bytes) -> object:
    """The JSON body, or APIError: not JSON, not UTF-8, NaN/Infinity, or nested deeper than MAX_DEPTH."""
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).replace("Input data was truncated",
                                                                                            "invalid or truncated")
        raise APIError(f"the request body is not valid JSON: {why}") from None
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(f"the request body is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value if isinstance(v, (dict, list))]
    return body


# fields -----------------------------------------------------------------------------------------------------
def _int(body: dict, key: str, default, low: int, high: int):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise APIError(f"'{key}' must be an integer", param=key)
    if not low <= value <= high:
        raise APIError(f"'{key}'={value} is out of range [{low}, {high}]", param=key)
    return int(value)


def _float(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(f"'{key}' must be a number", param=key)
    if not low <= value <= high:
        raise APIError(f"'{key}'={value} is out of range [{low}, {high}]", param=key)
    return float(value)


def flag(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"'{key}' must be true or false (a JSON boolean)", param=key)
    return value


def _text(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise APIError(f"'{param}' must be a string", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(f"'{param}' is not valid Unicode (a lone surrogate)", param=param) from None
    return value


def token_id_list(value: list, param: str) -> list[int]:
    if not value or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < _I64 for t in value):
        raise APIError(f"'{param}' must be a non-empty list of token ids (non-negative integers)", param=param)
    return list(value)


# what moe_pd takes ------------------------------------------------------------------------------------------
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream", "stream_options",
           "presence_penalty", "frequency_penalty", "logprobs", "user", "ignore_eos", "return_token_ids",
           "logit_bias"}
_COMPLETIONS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                   "function_call", "parallel_tool_calls", "response_format", "store", "metadata", "service_tier",
                   "modalities"}
_ONLY = {  # accepted only with their no-op values, anything else would be silently ignored
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "store": (None, False), "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]),
}
ROLES = ("system", "developer", "user", "assistant")


@dataclass
class GenerationRequest:
    """A checked request: its prompts (text or ids; the HTTP app tokenizes text into `prompt_ids`) and how to
    generate `n` sequences from each."""

    prompts: list[str | list[int]]
    max_tokens: int
    params: SamplingParams
    seed: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    """Streams: usage so far on every chunk (vLLM's stream_options.continuous_usage_stats; guidellm asks)."""
    stop: list[str] = field(default_factory=list)
    echo: bool = False
    logprobs: int | None = None
    """Alternatives per token (completions: `logprobs`; chat: `top_logprobs` with `logprobs: true`)."""
    return_token_ids: bool = False
    ignore_eos: bool = False
    chat: bool = False
    prompt_ids: list[list[int]] = field(default_factory=list)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def parse_request(body: object, chat: bool, served_models: list[str], max_tokens_limit: int) -> GenerationRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    for key in body:
        if key not in (_CHAT if chat else _COMPLETIONS):
            raise APIError(f"unsupported parameter '{key}'", param=key)
        if key in _ONLY and body[key] not in _ONLY[key]:
            raise APIError(f"'{key}' is not supported (only {', '.join(map(repr, _ONLY[key][1:]))})", param=key)
    model = body.get("model")
    if model is not None and model not in served_models:
        raise APIError(f"model '{model}' does not exist; served: {', '.join(served_models)}", status=404,
                       param="model", kind="not_found_error")
    if "user" in body and body["user"] is not None:
        _text(body["user"], "user")
    if "metadata" in body and body["metadata"] is not None and not isinstance(body["metadata"], dict):
        raise APIError("'metadata' must be an object", param="metadata")
    flag(body, "parallel_tool_calls", True)
    n = _int(body, "n", 1, 1, MAX_CHOICES)
    if not chat and body.get("best_of") is not None and _int(body, "best_of", n, 1, MAX_CHOICES) != n:
        raise APIError("'best_of' must equal 'n' (moe_pd returns every sequence it generates)", param="best_of")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, max_tokens_limit if chat else 16, 1, max_tokens_limit)
    stream = flag(body, "stream")
    include_usage = continuous_usage = False
    if body.get("stream_options") is not None:
        options = body["stream_options"]
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise APIError("'stream_options' takes only 'include_usage' and 'continuous_usage_stats'",
                           param="stream_options")
        include_usage = flag(options, "include_usage")
        continuous_usage = flag(options, "continuous_usage_stats")
    if chat:
        logprobs = None
        if flag(body, "logprobs"):
            logprobs = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        elif body.get("top_logprobs") is not None:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        prompts: list[str | list[int]] = [render_chat(body.get("messages"))]
        echo = False
    else:
        logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        prompts = _prompts(body.get("prompt"))
        echo = flag(body, "echo")
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} sequences", param="n")
    params = SamplingParams(temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                            top_k=max(_int(body, "top_k", 0, -1, 2**31 - 1), 0),  # -1: off, as vLLM
                            top_p=_float(body, "top_p", 1.0, 1e-9, 1.0),
                            presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
                            frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
                            logprobs=logprobs, prompt_logprobs=logprobs if echo and logprobs is not None else None)
    return GenerationRequest(prompts, max_tokens, params, _int(body, "seed", None, -_I64, 2**64 - 1), n, stream,
                             include_usage, continuous_usage, _stop(body.get("stop")), echo, logprobs,
                             flag(body, "return_token_ids"), flag(body, "ignore_eos"), chat)


def _prompts(prompt: object) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise APIError("'prompt' must be a string, a list of token ids, or a list of either", param="prompt")
    if len(prompts) > MAX_CHOICES:
        raise APIError(f"more than {MAX_CHOICES} prompts", param="prompt")
    out: list[str | list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            if not _text(p, "prompt"):
                raise APIError("'prompt' is empty", param="prompt")
            out.append(p)
        else:
            out.append(token_id_list(p, "prompt"))
    return out


def _stop(stop: object) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP:
        raise APIError(f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    for s in stops:
        if not _text(s, "stop"):
            raise APIError("'stop' strings must not be empty", param="stop")
    return list(stops)


def message_text(m: object, i: int) -> tuple[str, str]:
    """(role, text) of one chat message; content as a string or a list of text parts."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise APIError(f"'{where}' must be an object", param="messages")
    for key in m:
        if key not in ("role", "content", "name"):
            raise APIError(f"'{where}.{key}' is not supported", param="messages")
    role = m.get("role")
    if role not in ROLES:
        raise APIError(f"'{where}.role' must be one of {', '.join(ROLES)}", param="messages")
    if m.get("name") is not None:
        _text(m["name"], "messages")
    content = m.get("content")
    if content is None and role == "assistant":
        return role, ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or set(part) - {"type", "text"}:
                raise APIError(f"'{where}.content[{j}]' must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                               "this model takes text only", param="messages")
            parts.append(_text(part.get("text"), "messages"))
        return role, "".join(parts)
    return role, _text(content, "messages")


def render_chat(messages: object) -> str:
    """The chat as the tiny model was taught it: `role: content` lines, then `assistant:` (developer messages
    are the system's)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    lines = []
    for i, m in enumerate(messages):
        role, text = message_text(m, i)
        lines.append(f"{'system' if role == 'developer' else role}: {text}\n")
    return "".join(lines) + "assistant:"


def check_prompt(prompt_ids: list[int], vocab_size: int, max_context: int) -> None:
    """A prompt the model can take (the engine's own check, answered as a 400 before any engine sees it)."""
    problem = prompt_problem(prompt_ids, vocab_size, max_context)
    if problem:
        raise APIError(f"the prompt {problem}", param="prompt")
