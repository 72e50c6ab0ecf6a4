"""One NIXL agent per rank: created once, the KV pool registered once, peers loaded from metadata bytes.

NIXL (github.com/ai-dynamo/nixl) moves registered memory between agents over UCX (RDMA, NVLink, TCP).
Each rank owns one `NixlAgent`; `metadata()` is the bytes a peer needs to reach this rank's pool (the
agent's connection info and registered regions, plus the pool's layout), carried by the control path;
`add_peer` loads them. Notices (small messages NIXL delivers after a transfer's data, or on their own)
carry a transfer's start and outcome.

NIXL's own progress thread spins a core (measured: 2.4 s of CPU in 3 s idle), so the agent runs without
it and this module progresses UCX from a Python thread. Progress matters on both ends: over TCP, UCX
emulates one-sided operations with messages the remote side must handle (a target polled every 20 ms moved
data at a tenth of the speed), and NIXL sends a transfer's notice only when the initiator checks the
transfer after its data completed. The thread sleeps between rounds by what is going on:
- `busy_s` while data moves: this rank's own transfers are in flight, or a peer announced one into (or
  out of) this rank's pool with a `Started` notice whose end notice has not come yet;
- `wait_s` while a transfer is expected (`expect_until`: a decode rank's reservations), so a `Started`
  notice is seen within that time;
- `idle_s` otherwise.
The agent is created with NIXL's strict thread sync, so the two threads may call it concurrently.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping

import msgspec
import torch

from moe_pd.kvcache.transfer.page_map import PoolLayout

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
INSTALL_HINT = "install it without CUDA's dependencies: pip install --no-deps nixl==1.5.2 nixl-cu12==1.5.1"
UCX_ONE_HOST_CPU = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}
"""UCX settings for CPU pools whose peers all run on this host: TCP on loopback. Left alone, UCX picks shared
memory between processes on one host, or the host's other addresses too."""


class NixlUnavailable(RuntimeError):
    """NIXL's Python package is not installed (or cannot load)."""


def import_nixl():
    try:
        from nixl import _api
    except ImportError as exc:
        raise NixlUnavailable(f"NIXL is not available ({exc}); {INSTALL_HINT}") from exc
    return _api


def nixl_available() -> bool:
    try:
        import_nixl()
    except NixlUnavailable:
        return False
    return True


class PeerInfo(msgspec.Struct, frozen=True):
    """What a rank publishes so that peers can reach its pool."""

    version: int
    name: str
    agent_metadata: bytes
    layout: PoolLayout


class Started(msgspec.Struct, frozen=True, tag="kv2.started"):
    """Sent before a transfer is posted: the remote side should progress UCX closely until it ends."""

    transfer_id: str


class Delivered(msgspec.Struct, frozen=True, tag="kv2.delivered"):
    """Sent by NIXL after every byte of a WRITE landed."""

    transfer_id: str
    dst_pages: list[int]
    """The destination pages written, in token order (the reservation's first pages)."""
    num_tokens: int
    payload: bytes
    """The caller's own header (first token, sampler state...)."""


class ReadDone(msgspec.Struct, frozen=True, tag="kv2.read"):
    """Sent by NIXL to the owner of the pages after a READ of them completed: they may change again."""

    transfer_id: str


class Abandoned(msgspec.Struct, frozen=True, tag="kv2.abandoned"):
    """The initiator gave up on a transfer (failed, timed out or cancelled)."""

    transfer_id: str
    posted: bool
    """Whether any data was posted: if so, bytes already on the wire may still move."""
    reason: str
    op: str = "write"


Notice = Started | Delivered | ReadDone | Abandoned
_encoder = msgspec.msgpack.Encoder()
_notice_decoder = msgspec.msgpack.Decoder(Notice)
_peer_decoder = msgspec.msgpack.Decoder(PeerInfo)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_notice(raw: bytes) -> Notice:
    """Raises msgspec.DecodeError / ValidationError on anything that is not one of ours."""
    return _notice_decoder.decode(raw)


class NixlAgent:
    """A rank's NIXL agent with its KV pool registered and a progress thread."""

    def __init__(self, name: str, kv_LPSW: torch.Tensor, ucx_env: Mapping[str, str] | None = None,
                 busy_s: float = 0.001, wait_s: float = 0.005, idle_s: float = 0.05, flow_timeout_s: float = 60.0
                 ) -> None:
        for key, value in (ucx_env or {}).items():
            if os.environ.setdefault(key, value) != value:
                log.info("%s=%s from the environment kept (moe_pd would set %s)", key, os.environ[key], value)
        api = import_nixl()
        self.name = f"{name}-{uuid.uuid4().hex[:8]}"
        config = api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"],
                                       sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = api.nixl_agent(self.name, config)
        self.kv_LPSW = kv_LPSW
        self.layout = PoolLayout.of(kv_LPSW)
        self.registered = self.agent.register_memory(kv_LPSW)  # DRAM or VRAM (with its device) from the tensor
        self.peers: dict[str, PeerInfo] = {}
        self.lock = threading.Lock()
        """Held while a transfer handle is checked or released, so neither thread uses a freed handle."""
        self.handles: dict[str, tuple[str, object]] = {}
        """Posted transfers the progress thread checks: transfer id -> (op, NIXL handle)."""
        self.finished: dict[str, collections.deque[tuple[str, str, str]]] = {
            "write": collections.deque(), "read": collections.deque()}
        """By op: (transfer id, "DONE" | "ERR", detail) of handles the progress thread saw end (and released)."""
        self.notices: dict[str, collections.deque[tuple[str, Notice]]] = {
            "write": collections.deque(), "read": collections.deque()}
        """(peer, notice) about writes into this pool (Delivered, Abandoned) and reads of it (ReadDone,
        Abandoned), decoded by the progress thread."""
        self.counters = collections.Counter()
        """malformed_notices, and what the consumers count (unknown_notices, late_notices...)."""
        self.flowing: dict[str, float] = {}
        """Transfers a peer announced (Started) and has not ended: transfer id -> when to stop waiting."""
        self.wait_until = 0.0
        self.busy_s, self.wait_s, self.idle_s, self.flow_timeout_s = busy_s, wait_s, idle_s, flow_timeout_s
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._progress, name=f"nixl-progress-{self.name}", daemon=True)
        self._thread.start()

    def metadata(self) -> bytes:
        """This rank's agent and pool, for peers that will reach it (send over the control path)."""
        return encode(PeerInfo(PROTOCOL_VERSION, self.name, self.agent.get_agent_metadata(), self.layout))

    def add_peer(self, raw: bytes) -> PeerInfo:
        """Loads a peer's metadata once (again only if it changed); raises ValueError on metadata that is not
        ours, of another protocol version, or of a pool KV cannot move to."""
        try:
            info = _peer_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"malformed NIXL peer metadata: {exc}") from exc
        if info.version != PROTOCOL_VERSION:
            raise ValueError(f"peer {info.name} speaks KV protocol {info.version}, this rank {PROTOCOL_VERSION}")
        if why := self.layout.mismatch(info.layout):
            raise ValueError(f"peer {info.name}'s KV pool does not fit this one: {why}")
        if self.peers.get(info.name) != info:
            if info.name in self.peers:
                self.agent.remove_remote_agent(info.name)
            loaded = self.agent.add_remote_agent(info.agent_metadata)
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != info.name:
                raise ValueError(f"peer metadata names agent {loaded!r}, its header {info.name!r}")
            self.peers[info.name] = info
        return info

    def forget_peer(self, name: str) -> None:
        if self.peers.pop(name, None) is not None:
            try:
                self.agent.remove_remote_agent(name)
            except Exception as exc:  # a peer that is gone may already be disconnected
                log.debug("removing NIXL peer %s: %s", name, exc)

    def notify(self, peer: str, notice: Notice) -> bool:
        """Sends a notice on its own; False (logged) when it could not be sent (the peer may be gone)."""
        try:
            self.agent.send_notif(peer, encode(notice))
            return True
        except Exception as exc:
            log.debug("notice %s to %s not sent: %s", type(notice).__name__, peer, exc)
            return False

    def post(self, transfer_id: str, op: str, handle) -> str:
        """Starts a created transfer and hands it to the progress thread; returns NIXL's first state."""
        with self.lock:
            state = self.agent.transfer(handle)
            if state != "ERR":
                self.handles[transfer_id] = (op, handle)
        self._wake.set()
        return state

    def abort(self, transfer_id: str) -> bool:
        """Releases a posted transfer that has not ended (NIXL cancels what it can); False if it had ended."""
        with self.lock:
            entry = self.handles.pop(transfer_id, None)
            if entry is not None:
                self.release(transfer_id, entry[1])
        return entry is not None

    def expect_until(self, when: float) -> None:
        """A transfer into (or out of) this pool may start before `when` (monotonic): poll every `wait_s`."""
        self.wait_until = max(self.wait_until, when)
        self._wake.set()

    def release(self, transfer_id: str, handle) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as exc:
            log.warning("NIXL could not release transfer %s: %s", transfer_id, exc)

    def _take_notices(self, now: float) -> None:
        for peer, messages in self.agent.get_new_notifs().items():
            for raw in messages:
                try:
                    notice = decode_notice(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self.counters["malformed_notices"] += 1
                    log.warning("malformed NIXL notice from %s dropped: %s", peer, exc)
                    continue
                if isinstance(notice, Started):
                    self.flowing[notice.transfer_id] = now + self.flow_timeout_s
                    continue
                self.flowing.pop(notice.transfer_id, None)
                op = "read" if isinstance(notice, ReadDone) or getattr(notice, "op", "") == "read" else "write"
                self.notices[op].append((peer, notice))
        for transfer_id in [t for t, until in self.flowing.items() if until < now]:
            del self.flowing[transfer_id]  # its end notice was lost (the peer died): stop hurrying

    def _check_handles(self) -> None:
        with self.lock:
            for transfer_id, (op, handle) in list(self.handles.items()):
                try:
                    state, detail = self.agent.check_xfer_state(handle), ""
                except Exception as exc:  # NIXL raises e.g. nixlRemoteDisconnectError when the peer died
                    state, detail = "ERR", f"{type(exc).__name__}: {exc}"
                if state != "PROC":
                    del self.handles[transfer_id]
                    self.release(transfer_id, handle)
                    self.finished[op].append((transfer_id, state, detail))

    def interval(self, now: float) -> float:
        if self.handles or self.flowing:
            return self.busy_s
        return self.wait_s if now < self.wait_until else self.idle_s

    def _progress(self) -> None:
        if self.layout.mem_type == "VRAM":  # UCX's CUDA transports copy on the calling thread's device
            torch.cuda.set_device(self.layout.device_id)
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self._take_notices(now)
                self._check_handles()
            except Exception:
                log.exception("NIXL progress round failed")
            interval = self.interval(now)
            if interval == self.busy_s:
                self._stop.wait(interval)
            else:
                self._wake.wait(interval)
                self._wake.clear()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        with self.lock:
            for transfer_id, (_, handle) in self.handles.items():
                self.release(transfer_id, handle)
            self.handles.clear()
        for name in list(self.peers):
            self.forget_peer(name)
        self.agent.deregister_memory(self.registered)
