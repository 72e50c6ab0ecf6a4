"""OpenAI-compatible response bodies: one Choice per generated sequence (text that never splits a character,
stop strings cut across streamed chunks, log-probabilities), chunks, final bodies and usage.

A stop string ends its choice where it starts: the text ends before it, finish_reason is "stop", and the
handler aborts the sequence. While streaming, text that could still become a stop string is held back until
it cannot (vLLM and SGLang do the same). Log-probabilities are the model's (raw logits); a non-finite one is
sent as -9999.0, as vLLM does, because JSON has no -Infinity.
"""

from __future__ import annotations

import math

from moe_pd.engine.core.request import Logprob
from moe_pd.engine.tokenizer import Tokenizer
from moe_pd.serve.backend import Chunk


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class Choice:
    def __init__(self, index: int, tokenizer: Tokenizer | None, stops: list[str], echo: bool = False,
                 echo_text: str = "", prompt_ids: list[int] | None = None) -> None:
        """`echo`: the prompt (`echo_text`, `prompt_ids`) leads the choice's text and logprobs."""
        self.index, self.tokenizer, self.stops, self.echo = index, tokenizer, stops, echo
        self.echo_text, self.prompt_ids = (echo_text, prompt_ids or []) if echo else ("", [])
        self.ids: list[int] = []
        self.logprobs: list[Logprob] = []
        self.prompt_logprobs: list[Logprob | None] | None = None
        self.text = ""
        self.sent = 0
        """Characters of `text` already streamed."""
        self.sent_logprobs = 0
        self.offset = len(echo_text)
        """text_offset of the next streamed token (completions logprobs)."""
        self.finished = False
        self.reason: str | None = None
        self.sent_echo = not echo
        """The echoed prompt went out (streaming)."""
        self.cached: int | None = None
        """Prompt tokens served from a cache, as the first tokens said (a migrated re-run's, with the tokens
        already streamed appended to its prompt, does not replace it)."""

    def add(self, chunk: Chunk) -> bool:
        """Takes a chunk; True when a stop string ended the choice here (the backend must abort the rest)."""
        if self.finished:
            return False
        self.ids += chunk.ids
        self.logprobs += chunk.logprobs or []
        if self.cached is None and chunk.cached is not None:
            self.cached = chunk.cached
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        decoded = self.tokenizer.decode(self.ids) if self.tokenizer is not None else ""
        if self.stops:
            start = max(0, len(self.text) - max(map(len, self.stops)))
            found = [i for s in self.stops if (i := decoded.find(s, start)) >= 0]
            if found:
                self.text, self.finished, self.reason = decoded[: min(found)], True, "stop"
                return not chunk.finished
        self.text = decoded
        if chunk.finished:
            self.finished, self.reason = True, chunk.reason
        return False

    def delta(self) -> str:
        """Text not streamed yet that can be sent now."""
        end = len(self.text)
        if not self.finished:
            if self.text.endswith("\ufffd"):
                end -= 1  # a character whose bytes have not all arrived
            end -= _held_back(self.text[:end], self.stops)
        out = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out

    def new_logprobs(self) -> list[Logprob]:
        out = self.logprobs[self.sent_logprobs :]
        self.sent_logprobs = len(self.logprobs)
        return out

    def token_text(self, token: int) -> str:
        """The token as text; a token that is no text of its own (part of a character, a special token) is
        named the way OpenAI names partial bytes ("bytes:\\xe2"), or by its id, so top_logprobs keys stay
        distinct."""
        text = self.tokenizer.decode([token]) if self.tokenizer is not None else ""
        if text and "\ufffd" not in text:
            return text
        raw = getattr(self.tokenizer, "token_bytes", lambda _: None)(token)
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw else f"<|token_{token}|>"

    # logprobs bodies ------------------------------------------------------------------------------------
    def completion_logprobs(self, entries: list[tuple[int, Logprob | None]], offset: int) -> dict:
        """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset (the chosen token is
        always among its position's top_logprobs, as vLLM does)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in entries:
            text = self.token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_finite(lp.logprob))
            top = {self.token_text(t): _finite(v) for t, v in lp.top}
            top.setdefault(text, _finite(lp.logprob))
            out["top_logprobs"].append(top)
        return out

    def chat_logprobs(self, entries: list[Logprob]) -> dict:
        def one(token: int, value: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": _finite(value), "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}
                            for lp in entries]}

    def stream_logprobs(self, chat: bool) -> dict | None:
        entries = self.new_logprobs()
        if not entries:
            return None
        if chat:
            return self.chat_logprobs(entries)
        body = self.completion_logprobs([(lp.token, lp) for lp in entries], self.offset)
        self.offset += sum(len(t) for t in body["tokens"])
        return body

    def echo_entries(self) -> list[tuple[int, Logprob | None]]:
        prompt = self.prompt_logprobs or [None] * len(self.prompt_ids)
        return list(zip(self.prompt_ids, prompt))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; prompt_tokens_details.cached_tokens: prompt tokens served from a cache (device pages,
    host DRAM or disk) instead of being computed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": min(cached_tokens, prompt_tokens)}}


def final_choice(choice: Choice, chat: bool, logprobs: bool, with_ids: bool) -> dict:
    if chat:
        out = {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
               "logprobs": choice.chat_logprobs(choice.logprobs) if logprobs else None,
               "finish_reason": choice.reason}
    else:
        entries = [(lp.token, lp) for lp in choice.logprobs]
        if choice.echo:
            entries = choice.echo_entries() + entries
        out = {"index": choice.index, "text": choice.echo_text + choice.text,
               "logprobs": choice.completion_logprobs(entries, 0) if logprobs else None,
               "finish_reason": choice.reason}
    if with_ids:
        out["token_ids"] = choice.ids
    return out


def stream_choice(choice: Choice, chat: bool, text: str, ids: list[int], logprobs: dict | None,
                  with_ids: bool) -> dict:
    reason = choice.reason if choice.finished else None
    out = ({"index": choice.index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": reason}
           if chat else {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": reason})
    if with_ids:
        out["token_ids"] = ids
    return out


def envelope(request_id: str, created: int, model: str, chat: bool, stream: bool, choices: list[dict]) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices}
