"""Which KV transfer backend a rank uses, and its two ends, built once at a rank's start-up.

`kvcache.transfer=auto` picks by the KV pool's device from what perf/bench_kv_transfer.py measured
(docs/kv_transfer.md, perf/results/): NIXL on CPU (about 2.5x pyzmq's speed on one host, through the
real transfer path), pyzmq on CUDA until a GPU run measures NIXL there; pyzmq wherever NIXL is not
installed. Prefill and decode instances must resolve to the same backend (a sender refuses a target of
another backend with a clear error).
"""

from __future__ import annotations

import ipaddress
import logging

import torch

from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.kvcache.transfer.base import KVReceiverEnd, KVSenderEnd
from moe_pd.kvcache.transfer.nixl_agent import nixl_available

log = logging.getLogger(__name__)

MEASURED_DEFAULT = {"cpu": "nixl", "cuda": "zmq"}
"""The backend perf/bench_kv_transfer.py measured faster, per device kind (cuda: not measured yet)."""


def resolve_backend(name: str, device_type: str, have_nixl: bool | None = None) -> str:
    """`name` ("auto", "zmq", "nixl") -> the backend to run; raises NixlUnavailable for "nixl" without it."""
    have_nixl = nixl_available() if have_nixl is None else have_nixl
    if name == "auto":
        chosen = MEASURED_DEFAULT.get(device_type, "zmq")
        if chosen == "nixl" and not have_nixl:
            log.info("kvcache.transfer=auto: NIXL is not installed, using zmq")
            return "zmq"
        return chosen
    if name == "nixl" and not have_nixl:
        from moe_pd.kvcache.transfer.nixl_agent import import_nixl

        import_nixl()  # raises NixlUnavailable with the install hint
    return name


def ucx_env(kv_LPSW: torch.Tensor, kv_host: str) -> dict[str, str]:
    """UCX settings the code sets (a value already in the environment wins): CPU pools move over TCP, on
    the loopback device when the ranks' KV address is a loopback one; GPU pools let UCX choose (NVLink,
    CUDA IPC, RDMA)."""
    if kv_LPSW.device.type == "cuda":
        return {}
    loopback = kv_host == "localhost" or _is_loopback(kv_host)
    return {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"} if loopback else {"UCX_TLS": "tcp"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _agent(cfg: KVCacheConfig, kv_LPSW: torch.Tensor, name: str, kv_host: str, timeout_s: float):
    from moe_pd.kvcache.transfer.nixl_agent import NixlAgent

    return NixlAgent(name, kv_LPSW, ucx_env(kv_LPSW, kv_host), busy_s=cfg.nixl_busy_poll_ms / 1000,
                     wait_s=cfg.nixl_wait_poll_ms / 1000, flow_timeout_s=timeout_s)


def make_sender(backend: str, cfg: KVCacheConfig, kv_LPSW: torch.Tensor, name: str, kv_host: str = "127.0.0.1",
                timeout_s: float = 60.0) -> KVSenderEnd:
    if backend == "nixl":
        from moe_pd.kvcache.transfer.nixl_transport import NixlSender

        return NixlSender(_agent(cfg, kv_LPSW, name, kv_host, timeout_s))
    from moe_pd.kvcache.transfer.zmq_transport import KVSender

    return KVSender(name)


def make_receiver(backend: str, cfg: KVCacheConfig, kv_LPSW: torch.Tensor, name: str, kv_host: str = "127.0.0.1",
                  advertise_host: str = "", timeout_s: float = 60.0) -> KVReceiverEnd:
    """`timeout_s` (the configured KV timeout) is also NIXL's fence: see nixl_transport."""
    if backend == "nixl":
        from moe_pd.kvcache.transfer.nixl_transport import NixlReceiver

        return NixlReceiver(_agent(cfg, kv_LPSW, name, kv_host, timeout_s), fence_s=timeout_s)
    from moe_pd.kvcache.transfer.zmq_transport import KVReceiver

    receiver = KVReceiver(kv_LPSW, bind=f"tcp://{kv_host}:*")
    if advertise_host:
        receiver.address = receiver.address.replace(f"//{kv_host}:", f"//{advertise_host}:")
    return receiver
