"""KV transfer over ZeroMQ (pyzmq): works between hosts over TCP, on CPU and (host-staged) GPU caches.

The receiver (a decode rank) binds a ROUTER socket; each sender (a prefill rank) connects a DEALER socket per
decode rank. A transfer is one multipart message: [KVHeader, latent rows]; the receiver copies the rows into
the reserved pages and answers with a KVAnswer. The rows are the request's tokens in order ([L, tokens, W]),
so the two pools may cut them into pages of different sizes. They are gathered into one host buffer, sent
without a copy (zmq copy=False) and received as a zmq frame viewed as a tensor. Sockets are used only from
the thread that owns the endpoint; `poll()` does all the work and never blocks longer than asked. Neither
end keeps per-request state: the requests' records hold their transfer entries (deadlines, outcomes), and
the receiver asks its owner where a request's latents go. The receiver writes the bytes itself, so a failed
reservation's pages are free at once (fence_s = 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import zmq

from moe_pd.kvcache.transfer.base import (
    Arrival,
    KVAnswer,
    KVHeader,
    KVTarget,
    TransferState,
    decode_answer,
    decode_header,
    encode,
)
from moe_pd.runtime import dtype_from_name, dtype_name

log = logging.getLogger(__name__)


def flat_rows(kv_LPSW: torch.Tensor, pages: list[int], num_tokens: int) -> torch.Tensor:
    """int64 row index into kv_LPSW.view(L, P * S, W) of a request's first `num_tokens` tokens."""
    block = kv_LPSW.shape[2]
    token_T = torch.arange(num_tokens)
    return torch.as_tensor(pages, dtype=torch.int64)[token_T // block] * block + token_T % block


class KVReceiver:
    """Decode side: `poll` stores arriving latents into the pages their request reserved."""

    backend = "zmq"
    fence_s = 0.0

    def __init__(self, kv_LPSW: torch.Tensor, bind: str = "tcp://127.0.0.1:*") -> None:
        self.kv_LPSW = kv_LPSW
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def target(self, pages: list[int], expires_in_s: float) -> KVTarget:
        return KVTarget(self.backend, self.address, expires_in_s)

    def poll(self, pages_for: Callable[[str], list[int] | None], timeout_ms: int = 0) -> list[Arrival]:
        """Handles arrived transfers: `pages_for(request id)` names the reserved pages (None: not expected).
        Returns every transfer that decoded, stored (DONE) or refused (REJECTED); every sender gets an
        answer."""
        done: list[Arrival] = []
        wait = timeout_ms
        while self.socket.poll(wait, zmq.POLLIN):
            wait = 0
            frames = self.socket.recv_multipart(copy=False)
            header = decode_header(frames[1].bytes) if len(frames) == 3 else None
            if header is None:
                continue  # nothing to answer: the sender's entry times out
            state, detail = self._store(header, frames[2], pages_for(header.request_id))
            self.socket.send_multipart([frames[0].bytes, encode(KVAnswer(header.request_id, state, detail))])
            done.append(Arrival(header.request_id, state, detail, len(frames[2].buffer), header))
        return done

    def _store(self, header: KVHeader, payload, pages: list[int] | None) -> tuple[TransferState, str]:
        if pages is None:
            return TransferState.REJECTED, "no pages reserved for this request (unknown, aborted or expired)"
        layers, _, block, width = self.kv_LPSW.shape
        dtype = dtype_name(self.kv_LPSW.dtype)
        want = (layers, header.num_tokens, width)
        size = self.kv_LPSW.element_size() * layers * header.num_tokens * width
        if (header.shape() != want or header.dtype != dtype or len(payload.buffer) != size
                or header.num_tokens > len(pages) * block):
            return TransferState.REJECTED, (f"KV of {header.shape()} {header.dtype} does not fit {len(pages)} "
                                            f"reserved pages of {block} rows of {width} {dtype}")
        data = torch.frombuffer(payload.buffer, dtype=dtype_from_name(header.dtype)).view(header.shape())
        flat = self.kv_LPSW.view(layers, -1, width)
        flat[:, flat_rows(self.kv_LPSW, pages, header.num_tokens).to(flat.device)] = data.to(flat.device)
        return TransferState.DONE, ""

    def close(self) -> None:
        self.socket.close(0)


class KVSender:
    """Prefill side: `send` a request's rows to a decode rank's address, `poll` for the answers."""

    backend = "zmq"

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.context = zmq.Context.instance()
        self.sockets: dict[str, zmq.Socket] = {}

    def _socket(self, address: str) -> zmq.Socket:
        if address not in self.sockets:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self.sockets[address] = sock
        return self.sockets[address]

    def send(self, target: KVTarget, kv_LPSW: torch.Tensor, pages: list[int], header: KVHeader,
             deadline: float = 0.0) -> int:
        """Sends the request's rows (the receiver answers; the request's entry holds the deadline); returns
        the bytes sent."""
        layers, _, _, width = kv_LPSW.shape
        rows = flat_rows(kv_LPSW, pages, header.num_tokens).to(kv_LPSW.device)
        data = kv_LPSW.view(layers, -1, width)[:, rows].cpu()  # indexing gathers (host staging for GPU caches)
        raw = data.view(torch.uint8).numpy() if data.dtype == torch.bfloat16 else data.numpy()
        self._socket(target.address).send_multipart([encode(header), raw], copy=False)
        return data.numel() * data.element_size()

    def cancel(self, request_id: str, target: KVTarget, posted: bool, reason: str) -> None:
        """Nothing to stop: a message on its way is refused by the receiver once the request is gone there."""

    def poll(self, timeout_ms: int = 0) -> list[KVAnswer]:
        """The answers that arrived, waiting up to `timeout_ms` for the first."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            answers = [a for sock in self.sockets.values() for a in self._drain(sock)]
            if answers or time.monotonic() >= deadline:
                return answers
            time.sleep(0.001)

    @staticmethod
    def _drain(sock: zmq.Socket) -> list[KVAnswer]:
        out = []
        while sock.poll(0, zmq.POLLIN):
            answer = decode_answer(sock.recv())
            if answer is not None:
                out.append(answer)
        return out

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets.clear()
