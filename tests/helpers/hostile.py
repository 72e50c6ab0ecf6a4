"""Hostile requests, as a new user (or an attacker) sends them: each must get its expected status with an
OpenAI-style JSON error body naming the parameter, never a 500 and never a rank's death; and valid requests
at the edges of every range, which must be served. Used against the one-process server
(tests/unit/test_openai_edge.py) and through a PD cluster (tests/dist/test_chaos.py)."""

from __future__ import annotations

import json

import aiohttp

C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def _raw(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode()


# (name, path, body (dict) or raw bytes, status, a fragment of the error message or its param)
HOSTILE = [
    ("not json", C, b"{not json", 400, "not valid JSON"),
    ("empty body", C, b"", 400, "not valid JSON"),
    ("truncated", C, b'{"prompt": [1, 2', 400, "not valid JSON"),
    ("NaN", C, b'{"prompt": "x", "temperature": NaN}', 400, "not valid JSON"),
    ("Infinity", C, b'{"prompt": "x", "temperature": Infinity}', 400, "not valid JSON"),
    ("float overflow", C, b'{"prompt": "x", "temperature": 1e999}', 400, "not valid JSON"),
    ("nested 100 deep", C, b'{"prompt": "x", "user": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "nested"),
    ("nested 100000 deep", C, b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),
    ("invalid UTF-8", C, b'{"prompt": "\xff\xfe"}', 400, "not valid JSON"),
    ("lone surrogate", C, b'{"prompt": "\\ud800"}', 400, "not valid JSON"),
    ("a list body", C, [1, 2], 400, "JSON object"),
    ("a string body", C, "hello", 400, "JSON object"),
    ("max_tokens 0", C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens -1", C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens 1e30", C, {"prompt": "x", "max_tokens": 1e30}, 400, "max_tokens"),
    ("max_tokens a string", C, {"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("max_tokens 2.5", C, {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("temperature < 0", C, {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("temperature a string", C, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("top_p 0", C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p 1.5", C, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top_k -2", C, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("top_k 2**40", C, {"prompt": "x", "top_k": 2**40}, 400, "top_k"),
    ("seed 2**64", C, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    ("seed 2**200", C, {"prompt": "x", "seed": 2**200}, 400, "seed"),
    ("seed < -2**63", C, {"prompt": "x", "seed": -(2**63) - 1}, 400, "seed"),
    ("seed a string", C, {"prompt": "x", "seed": "1"}, 400, "seed"),
    ("stream 'false'", C, {"prompt": "x", "stream": "false"}, 400, "stream"),
    ("echo 1", C, {"prompt": "x", "echo": 1}, 400, "echo"),
    ("ignore_eos 'yes'", C, {"prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("n 0", C, {"prompt": "x", "n": 0}, 400, "'n'"),
    ("n 10**6", C, {"prompt": "x", "n": 10**6}, 400, "'n'"),
    ("best_of != n", C, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("logprobs 21", C, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("logprobs true (completions)", C, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("presence_penalty 3", C, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency_penalty -3", C, {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("stop ''", C, {"prompt": "x", "stop": ""}, 400, "stop"),
    ("stop [1]", C, {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("17 stops", C, {"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("logit_bias", C, {"prompt": "x", "logit_bias": {"5": 100}}, 400, "logit_bias"),
    ("suffix", C, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("unknown parameter", C, {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("prompt ''", C, {"prompt": ""}, 400, "prompt"),
    ("prompt []", C, {"prompt": []}, 400, "prompt"),
    ("prompt [[]]", C, {"prompt": [[]]}, 400, "prompt"),
    ("prompt [-1]", C, {"prompt": [-1]}, 400, "prompt"),
    ("prompt [2**70]", C, {"prompt": [2**70]}, 400, "prompt"),
    ("prompt outside the vocabulary", C, {"prompt": [256, 100_000]}, 400, "outside"),
    ("prompt past the context", C, {"prompt": [1] * 5000}, 400, "context"),
    ("prompt [true]", C, {"prompt": [True, False]}, 400, "prompt"),
    ("prompt 5", C, {"prompt": 5}, 400, "prompt"),
    ("model unknown", C, {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    ("include_usage 'yes'", C, {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "include_usage"),
    ("stream_options unknown", C, {"prompt": "x", "stream_options": {"bogus": True}}, 400, "stream_options"),
    ("messages []", CH, {"messages": []}, 400, "messages"),
    ("messages a string", CH, {"messages": "hi"}, 400, "messages"),
    ("role robot", CH, {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("tool role", CH, {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("image part", CH, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "text part"),
    ("content 5", CH, {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("message with extras", CH, {"messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "extra"),
    ("tools", CH, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("json mode", CH, {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("top_logprobs without logprobs", CH, {"messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
    ("top_logprobs 50", CH, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("max_completion_tokens 0", CH, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("echo in chat", CH, {"messages": MSG, "echo": True}, 400, "echo"),
    ("tokenize a number", "/tokenize", {"prompt": 5}, 400, "prompt"),
    ("detokenize -1", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("detokenize outside the vocabulary", "/detokenize", {"tokens": [100_000]}, 400, "tokens"),
    ("no such path", "/v1/nope", {}, 404, "Not Found"),
    ("GET on a POST path", "GET /v1/completions", None, 405, "Method Not Allowed"),
    ("a 9 MiB body", C, b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}', 413, "larger than"),
]

# valid requests at the edges: each must be served (200)
ACCEPTED = [
    ("temperature 1e-30", C, {"prompt": "x", "temperature": 1e-30, "max_tokens": 3}),
    ("temperature 1e-6 top_k 1", C, {"prompt": "x", "temperature": 1e-6, "top_k": 1, "max_tokens": 3}),
    ("top_p 1e-9", C, {"prompt": "x", "temperature": 2.0, "top_p": 1e-9, "max_tokens": 3}),
    ("seed 2**64 - 1", C, {"prompt": "x", "temperature": 1.0, "seed": 2**64 - 1, "max_tokens": 3}),
    ("seed -2**63", C, {"prompt": "x", "temperature": 1.0, "seed": -(2**63), "max_tokens": 3}),
    ("penalties -2", C, {"prompt": "x", "presence_penalty": -2, "frequency_penalty": -2, "max_tokens": 3}),
    ("prompt [0]", C, {"prompt": [0], "max_tokens": 3}),
    ("emoji and NUL", C, {"prompt": "😀\u0000é", "max_tokens": 3}),
    ("logprobs 20", C, {"prompt": "x", "logprobs": 20, "max_tokens": 2}),
    ("n 3 with stops", C, {"prompt": ["a", "b"], "n": 3, "stop": ["zzz", "\n"], "max_tokens": 3}),
    ("chat with extras", CH, {"messages": [{"role": "developer", "content": [{"type": "text", "text": "x"}]},
                                           {"role": "assistant", "content": None}, *MSG],
                              "tool_choice": "none", "user": "u", "metadata": {"a": "b"}, "max_completion_tokens": 2}),
]


async def send(url: str, path: str, body) -> tuple[int, dict | None, str]:
    """(status, the JSON body or None, Content-Type)."""
    method = "POST"
    if path.startswith("GET "):
        method, path = "GET", path[4:]
    data = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url + path, data=data, headers={"Content-Type": "application/json"}) as r:
            try:
                return r.status, await r.json(content_type=None), r.headers.get("Content-Type", "")
            except ValueError:
                return r.status, None, r.headers.get("Content-Type", "")


def check_error(case, status: int, body: dict | None, content_type: str) -> None:
    name, _, _, want_status, fragment = case
    assert status == want_status, (name, status, body)
    assert content_type.startswith("application/json"), (name, content_type)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == want_status, (name, error)
    assert fragment in error["message"] or fragment.strip("'") == error["param"], (name, error)
