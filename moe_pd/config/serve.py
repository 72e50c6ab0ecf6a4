"""Schemas of the serving commands: the one-process server (`moe_pd.serve.api_server`), a PD cluster's
instances (`moe_pd.serve.service`) and its router (`moe_pd.serve.router`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_pd.config.engine import EngineConfig, RankGroupConfig
from moe_pd.config.errors import check
from moe_pd.config.model import ModelConfig


@dataclass
class ServeConfig(EngineConfig):
    """An OpenAI-compatible HTTP server over one engine."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """TCP port; 0 picks a free one (printed at start-up)."""
    served_model_name: str = "moe_pd"
    """The model id clients send in 'model' and /v1/models lists."""
    max_num_seqs: int = 64
    """Requests generated together."""
    max_tokens_limit: int = 4096
    """Largest 'max_tokens' a request may ask for."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long requests in flight may take to finish (new ones get 503) before the server stops."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.port < 65536, "port", self.port, "must be in [0, 65535]")
        check(self.max_num_seqs > 0, "max_num_seqs", self.max_num_seqs, "must be > 0")
        check(self.max_tokens_limit > 0, "max_tokens_limit", self.max_tokens_limit, "must be > 0")
        check(self.drain_timeout_s >= 0, "drain_timeout_s", self.drain_timeout_s, "must be >= 0")


@dataclass
class ServiceConfig(RankGroupConfig):
    """One instance of a PD cluster: a torchrun job of ranks that step together (EP MoE, DP attention).

    Its leader (rank 0) listens for routers on `host:port`; decode ranks also listen for KV transfers on
    `kv_host` (any free port, advertised to the router as `advertise_host`)."""

    role: str = "prefill"
    """prefill (prompts -> first token + KV shipped to decode), decode (KV in -> tokens out), or colocated
    (both phases in one instance: the baseline)."""
    host: str = "127.0.0.1"
    """Address the leader's control socket binds to (0.0.0.0 for routers on other hosts)."""
    port: int = 9100
    """Port of the leader's control socket (routers connect to tcp://<leader host>:port)."""
    kv_host: str = "127.0.0.1"
    """Address decode ranks bind their KV receivers to (any free port)."""
    advertise_host: str = ""
    """Host name prefill ranks use to reach this rank's KV receiver; '' means kv_host."""
    max_num_seqs: int = 64
    """Requests per rank generated together."""
    kv_timeout_s: float = 60.0
    """A KV transfer not finished in this time fails and frees its pages: on prefill from the send, on decode
    from the reservation (so it also bounds the request's wait in the prefill queue)."""
    heartbeat_s: float = 0.5
    """Seconds between the leader's status messages to its routers."""
    idle_wait_ms: float = 5.0
    """How long an idle leader waits for requests before the ranks exchange control messages again."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: the instance tells its routers it is draining (they send it nothing new), finishes what it
    holds for up to this long, then its ranks exit."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.role in ("prefill", "decode", "colocated"), "role", self.role,
              "must be prefill, decode or colocated")
        check(0 <= self.port < 65536, "port", self.port, "must be in [0, 65535]")
        check(self.max_num_seqs > 0, "max_num_seqs", self.max_num_seqs, "must be > 0")
        check(self.kv_timeout_s > 0, "kv_timeout_s", self.kv_timeout_s, "must be > 0")
        check(self.heartbeat_s > 0, "heartbeat_s", self.heartbeat_s, "must be > 0")
        check(self.idle_wait_ms >= 0, "idle_wait_ms", self.idle_wait_ms, "must be >= 0")
        check(self.drain_timeout_s >= 0, "drain_timeout_s", self.drain_timeout_s, "must be >= 0")


@dataclass
class RouterConfig:
    """The HTTP front of a PD cluster: OpenAI API in, requests to prefill and decode instances out."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The served model (the router tokenizes and checks prompts against its vocabulary and context)."""
    prefill: list[str] = field(default_factory=list)
    """Prefill instances' control addresses, e.g. ['tcp://10.0.0.1:9100']."""
    decode: list[str] = field(default_factory=list)
    """Decode instances' control addresses."""
    colocated: list[str] = field(default_factory=list)
    """Colocated instances (used instead of prefill + decode: the baseline)."""
    host: str = "127.0.0.1"
    """Address the HTTP server listens on."""
    port: int = 8000
    """HTTP port; 0 picks a free one (printed at start-up)."""
    served_model_name: str = "moe_pd"
    """The model id clients send in 'model' and /v1/models lists."""
    max_tokens_limit: int = 4096
    """Largest 'max_tokens' a request may ask for."""
    heartbeat_timeout_s: float = 10.0
    """An instance silent for this long is marked down: its requests fail, new ones go elsewhere."""
    request_timeout_s: float = 600.0
    """A request with no progress from its instances for this long fails with 504."""
    migration_limit: int = 3
    """How often a request is run again after a failed KV transfer or a lost instance (from prefill, with the
    tokens already streamed appended) before it fails."""
    max_waiting: int = 256
    """Requests that may wait at the router for room (back-pressure) at once; more get 503 at once."""
    queue_timeout_s: float = 30.0
    """Longest a request waits at the router for room (or for an instance to come back) before a 503."""
    retry_after_s: float = 2.0
    """Retry-After of the router's 503 answers."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long requests in flight may take to finish (new ones get 503) before the router stops."""
    max_body_bytes: int = 8 * 2**20
    """Largest request body (413 above)."""
    log_level: str = "INFO"
    """Python logging level."""

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, "port", self.port, "must be in [0, 65535]")
        check(bool(self.colocated) != bool(self.prefill or self.decode), "colocated", self.colocated,
              "give either colocated instances or prefill and decode instances")
        check(bool(self.prefill) == bool(self.decode), "decode", self.decode,
              "PD mode needs at least one prefill and one decode instance")
        check(self.max_tokens_limit > 0, "max_tokens_limit", self.max_tokens_limit, "must be > 0")
        check(self.heartbeat_timeout_s > 0, "heartbeat_timeout_s", self.heartbeat_timeout_s, "must be > 0")
        check(self.request_timeout_s > 0, "request_timeout_s", self.request_timeout_s, "must be > 0")
        check(self.migration_limit >= 0, "migration_limit", self.migration_limit, "must be >= 0")
        check(self.max_waiting >= 0, "max_waiting", self.max_waiting, "must be >= 0")
        check(self.queue_timeout_s >= 0, "queue_timeout_s", self.queue_timeout_s, "must be >= 0")
        check(self.retry_after_s > 0, "retry_after_s", self.retry_after_s, "must be > 0")
        check(self.drain_timeout_s >= 0, "drain_timeout_s", self.drain_timeout_s, "must be >= 0")
        check(self.max_body_bytes > 0, "max_body_bytes", self.max_body_bytes, "must be > 0")
