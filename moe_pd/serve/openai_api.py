"""OpenAI-compatible request parsing and error bodies (the subset moe_pd serves)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.engine.core.request import SamplingParams, prompt_problem


class APIError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class GenerationRequest:
    prompt_ids: list[int] | None
    prompt_text: str | None
    max_tokens: int
    params: SamplingParams
    seed: int | None
    stream: bool
    return_token_ids: bool
    ignore_eos: bool
    chat: bool


def _number(body: dict, key: str, default, kind, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise APIError(f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(f"'{key}'={value} is out of range [{low}, {high}]", param=key)
    return kind(value)


def parse_request(body: object, chat: bool, served_models: list[str], max_tokens_limit: int) -> GenerationRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in served_models:
        raise APIError(f"model '{model}' does not exist; served: {', '.join(served_models)}", status=404,
                       param="model", kind="not_found_error")
    if _number(body, "n", 1, int, 1, 1) != 1:
        raise APIError("only n=1 is supported", param="n")
    max_tokens = _number(body, "max_tokens", 16, int, 1, max_tokens_limit)
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, float, 1e-9, 1.0)
    top_k = _number(body, "top_k", 0, int, 0, None)
    seed = body.get("seed")
    if seed is not None:  # the range torch.Generator.manual_seed takes
        seed = _number(body, "seed", None, int, -(2**63), 2**64 - 1)
    prompt_ids, text = None, None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError("'messages' must be a non-empty list", param="messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                    m.get("role") not in ("system", "user", "assistant"):
                raise APIError("each message needs a 'role' (system, user, assistant) and string 'content'",
                               param="messages")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt_ids = list(prompt)
        else:
            raise APIError("'prompt' must be a string or a list of token ids (one prompt per request)",
                           param="prompt")
        if (text is not None and not text) or (prompt_ids is not None and not prompt_ids):
            raise APIError("'prompt' is empty", param="prompt")
    return GenerationRequest(prompt_ids, text, max_tokens, SamplingParams(temperature, top_k, top_p), seed,
                             bool(body.get("stream", False)), bool(body.get("return_token_ids", False)),
                             bool(body.get("ignore_eos", False)), chat)


def check_prompt(prompt_ids: list[int], vocab_size: int, max_context: int) -> None:
    """A prompt the model can take (the engine's own check, answered as a 400 before any engine sees it)."""
    problem = prompt_problem(prompt_ids, vocab_size, max_context)
    if problem:
        raise APIError(f"the prompt {problem}", param="prompt")
