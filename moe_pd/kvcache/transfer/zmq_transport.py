"""KV transfer over ZeroMQ (pyzmq): works between hosts over TCP, on CPU and (host-staged) GPU caches.

The receiver (a decode rank) binds a ROUTER socket; each sender (a prefill rank) connects a DEALER socket per
decode rank. A transfer is one multipart message: [KVHeader, latent bytes]; the receiver answers with a
KVAnswer. Latents are sent from a contiguous host buffer without a copy (zmq copy=False) and received as a
zmq frame viewed as a tensor. Sockets are used only from the thread that owns the endpoint; `poll()` does
all the work and never blocks longer than asked. Neither end keeps per-request state: the requests' records
hold their transfer entries (deadlines, outcomes), and the receiver asks its owner where a request's latents
go.
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
    TransferState,
    decode_answer,
    decode_header,
    encode,
)
from moe_pd.runtime import dtype_from_name, dtype_name

log = logging.getLogger(__name__)


class KVReceiver:
    """Decode side: `poll` stores arriving latents into the pages their request reserved."""

    def __init__(self, kv_LPSW: torch.Tensor, bind: str = "tcp://127.0.0.1:*") -> None:
        self.kv_LPSW = kv_LPSW
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def poll(self, pages_for: Callable[[str], list[int] | None], timeout_ms: int = 0) -> list[Arrival]:
        """Handles arrived transfers: `pages_for(request id)` names the reserved pages (None: not expected).
        Returns the transfers of expected requests, stored (DONE) or refused (REJECTED); every sender gets an
        answer, also for an unexpected request (REJECTED)."""
        done: list[Arrival] = []
        wait = timeout_ms
        while self.socket.poll(wait, zmq.POLLIN):
            wait = 0
            frames = self.socket.recv_multipart(copy=False)
            header = decode_header(frames[1].bytes) if len(frames) == 3 else None
            if header is None:
                continue  # nothing to answer: the sender's entry times out
            pages = pages_for(header.request_id)
            state, detail = self._store(header, frames[2], pages)
            self.socket.send_multipart([frames[0].bytes, encode(KVAnswer(header.request_id, state, detail))])
            if pages is not None:
                done.append(Arrival(header.request_id, state, detail, len(frames[2].buffer), header))
        return done

    def _store(self, header: KVHeader, payload, pages: list[int] | None) -> tuple[TransferState, str]:
        if pages is None:
            return TransferState.REJECTED, "no pages reserved for this request (unknown, aborted or expired)"
        layers, _, block, width = self.kv_LPSW.shape
        want = (layers, len(pages), block, width)
        dtype = dtype_name(self.kv_LPSW.dtype)
        if header.shape() != want or header.dtype != dtype or len(payload.buffer) != _nbytes(want, self.kv_LPSW):
            return TransferState.REJECTED, (f"KV of shape {header.shape()} {header.dtype} does not fit the "
                                            f"reserved {want} {dtype}")
        data = torch.frombuffer(payload.buffer, dtype=dtype_from_name(header.dtype)).view(header.shape())
        self.kv_LPSW[:, pages] = data.to(self.kv_LPSW.device)
        return TransferState.DONE, ""

    def close(self) -> None:
        self.socket.close(0)


def _nbytes(shape: tuple[int, ...], like: torch.Tensor) -> int:
    return like.element_size() * shape[0] * shape[1] * shape[2] * shape[3]


class KVSender:
    """Prefill side: `send` a request's pages to a decode rank's address, `poll` for the answers."""

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

    def send(self, request_id: str, address: str, kv_LPSW: torch.Tensor, pages: list[int], num_tokens: int,
             first_token: int, rng_state: bytes = b"", drop: bool = False) -> int:
        """Sends the pages' latents; returns the bytes sent. `drop` (fault injection) skips the send, so the
        request's transfer entry times out."""
        data = kv_LPSW[:, pages].contiguous().cpu()  # host staging for GPU caches
        header = KVHeader(request_id, data.shape[0], data.shape[1], data.shape[2], data.shape[3],
                          dtype_name(data.dtype), num_tokens, first_token, self.name, rng_state)
        raw = data.view(torch.uint8).numpy() if data.dtype == torch.bfloat16 else data.numpy()
        if drop:
            log.warning("fault injection: KV transfer of %s dropped", request_id)
        else:
            self._socket(address).send_multipart([encode(header), raw], copy=False)
        return data.numel() * data.element_size()

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
