"""KV transfer over ZeroMQ (pyzmq): works between hosts over TCP, on CPU and (host-staged) GPU caches.

The receiver (a decode rank) binds a ROUTER socket; each sender (a prefill rank) connects a DEALER
socket per decode rank. A transfer is one multipart message: [KVHeader JSON, latent bytes]; the receiver
answers [request id, state, detail]. Latents are sent from a contiguous host buffer without a copy
(zmq copy=False) and received as a zmq frame viewed as a tensor. Sockets are used only from the thread
that owns the endpoint; `poll()` does all the work and never blocks longer than asked.
"""

from __future__ import annotations

import json
import logging
import time

import torch
import zmq

from moe_pd.kvcache.transfer.base import KVHeader, Transfer, TransferState

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KVReceiver:
    """Decode side: reserve pages with `expect`, then `poll` to store arriving latents into the cache."""

    def __init__(self, kv_LPSW: torch.Tensor, bind: str = "tcp://127.0.0.1:*") -> None:
        self.kv_LPSW = kv_LPSW
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.expected: dict[str, tuple[Transfer, list[int]]] = {}

    def expect(self, request_id: str, pages: list[int], timeout_s: float) -> Transfer:
        transfer = Transfer(request_id, time.monotonic() + timeout_s)
        self.expected[request_id] = (transfer, list(pages))
        return transfer

    def cancel(self, request_id: str) -> None:
        entry = self.expected.pop(request_id, None)
        if entry:
            entry[0].finish(TransferState.CANCELLED, "aborted")

    def poll(self, timeout_ms: int = 0) -> list[Transfer]:
        """Handles arrived messages and expired reservations; returns the transfers that became final."""
        done: list[Transfer] = []
        wait = timeout_ms
        while self.socket.poll(wait, zmq.POLLIN):
            wait = 0
            identity, raw_header, payload = self.socket.recv_multipart(copy=False)
            header = KVHeader.decode(raw_header.bytes)
            state, detail = self._store(header, payload)
            answer = json.dumps([header.request_id, state.value, detail]).encode()
            self.socket.send_multipart([identity.bytes, answer])
            entry = self.expected.pop(header.request_id, None)
            if entry is not None:
                transfer = entry[0]
                transfer.nbytes, transfer.first_token = len(payload.buffer), header.first_token
                transfer.num_tokens, transfer.rng_state = header.num_tokens, header.rng_state
                transfer.finish(state, detail)
                done.append(transfer)
        now = time.monotonic()
        for request_id, (transfer, _) in list(self.expected.items()):
            if now > transfer.deadline:
                del self.expected[request_id]
                transfer.finish(TransferState.TIMED_OUT, "no KV arrived before the deadline")
                done.append(transfer)
        return done

    def _store(self, header: KVHeader, payload) -> tuple[TransferState, str]:
        entry = self.expected.get(header.request_id)
        if entry is None:
            return TransferState.REJECTED, "no pages reserved for this request (unknown, aborted or expired)"
        _, pages = entry
        layers, _, block, width = self.kv_LPSW.shape
        want = (layers, len(pages), block, width)
        if header.shape() != want or header.dtype != dtype_name(self.kv_LPSW.dtype):
            return TransferState.REJECTED, (f"KV of shape {header.shape()} {header.dtype} does not fit the "
                                            f"reserved {want} {dtype_name(self.kv_LPSW.dtype)}")
        data = torch.frombuffer(payload.buffer, dtype=_DTYPES[header.dtype]).view(header.shape())
        self.kv_LPSW[:, pages] = data.to(self.kv_LPSW.device)
        return TransferState.DONE, ""

    def close(self) -> None:
        self.socket.close(0)


class KVSender:
    """Prefill side: `send` a request's pages to a decode rank's address, `poll` for the answers."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.context = zmq.Context.instance()
        self.sockets: dict[str, zmq.Socket] = {}
        self.in_flight: dict[str, Transfer] = {}
        self._cancelled: set[str] = set()

    def _socket(self, address: str) -> zmq.Socket:
        if address not in self.sockets:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self.sockets[address] = sock
        return self.sockets[address]

    def cancel(self, request_id: str) -> Transfer | None:
        """Marks an aborted request: it will not be sent, and an in-flight one is dropped on its answer.
        Returns the in-flight transfer it ended (None if there was none)."""
        self._cancelled.add(request_id)
        transfer = self.in_flight.pop(request_id, None)
        if transfer:
            transfer.finish(TransferState.CANCELLED, "aborted")
        return transfer

    def send(self, request_id: str, address: str, kv_LPSW: torch.Tensor, pages: list[int], num_tokens: int,
             first_token: int, timeout_s: float, rng_state: str = "", drop: bool = False) -> Transfer:
        """Sends the pages' latents; `drop` (fault injection) skips the send so the transfer times out."""
        transfer = Transfer(request_id, time.monotonic() + timeout_s)
        if request_id in self._cancelled:
            transfer.finish(TransferState.CANCELLED, "aborted before the transfer")
            return transfer
        data = kv_LPSW[:, pages].contiguous().cpu()  # host staging for GPU caches
        header = KVHeader(request_id, data.shape[0], data.shape[1], data.shape[2], data.shape[3],
                          dtype_name(data.dtype), num_tokens, first_token, self.name, rng_state)
        raw = data.view(torch.uint8).numpy() if data.dtype == torch.bfloat16 else data.numpy()
        if drop:
            log.warning("fault injection: KV transfer of %s dropped", request_id)
        else:
            self._socket(address).send_multipart([header.encode(), raw], copy=False)
        transfer.nbytes = data.numel() * data.element_size()
        self.in_flight[request_id] = transfer
        return transfer

    def poll(self, timeout_ms: int = 0) -> list[Transfer]:
        done: list[Transfer] = []
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            for sock in self.sockets.values():
                while sock.poll(0, zmq.POLLIN):
                    request_id, state, detail = json.loads(sock.recv())
                    transfer = self.in_flight.pop(request_id, None)
                    if transfer is not None:
                        transfer.finish(TransferState(state), detail)
                        done.append(transfer)
            now = time.monotonic()
            for request_id, transfer in list(self.in_flight.items()):
                if now > transfer.deadline:
                    del self.in_flight[request_id]
                    transfer.finish(TransferState.TIMED_OUT, "no answer from the decode rank before the deadline")
                    done.append(transfer)
            if done or now >= deadline or not self.in_flight:
                return done
            time.sleep(0.001)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        self.sockets.clear()
