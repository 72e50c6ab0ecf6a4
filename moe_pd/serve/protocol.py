"""The wire protocol of a PD cluster: every message between a router and an instance's leader, and between
the ranks of an instance, as a typed struct (msgspec: validated decoding, tagged unions on "op").

    router -> leader:  Hello | Generate | Reserve | Prefill | Abort          (RouterMessage)
    leader -> router:  Status | Reserved | Tokens | Prefilled | Error | Cached  (LeaderMessage)
    rank -> ranks:     RankReport, once per iteration through the ControlPlane: the rank's load and events
                       (what it sends to routers), and on the leader the commands for every rank

"reserve" takes pages on a decode rank (the answer names where its KV goes: a KVTarget with the rank's
address, its transfer backend, and for NIXL its agent metadata and the reserved pages, which the router hands
to prefill in "prefill"); "prefill" runs a prompt and ships its KV there; "generate" is both phases
on a colocated instance. Every request message carries the router's request id plus an attempt suffix
(`cmpl-...`.0, .1), so a late answer for an abandoned attempt is never taken for the re-run's.

A router says Hello with PROTOCOL_VERSION; the leader answers with Status (its own version) and sends one
every heartbeat to the routers it knows. A leader refuses a router of another version, and a router
ignores an instance of another version (it is never marked up). Receivers decode with `decode_*`, which
never raise: a malformed or unknown message is logged and dropped, and when a request message is broken
in its own content, the id it names (if any) gets an Error of its own, so one bad request fails alone.

KV pages themselves travel on the transfer engine's own channel (moe_pd.kvcache.transfer).
"""

from __future__ import annotations

import logging
from typing import Annotated, Union

import msgspec

from moe_pd.engine.core.request import Logprob, SamplingParams
from moe_pd.kvcache.transfer.base import KVTarget

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 5
"""Bump on any change a peer of the previous version would misread (3: Reserved and Prefill carry a KVTarget;
4: cache reports (Cached, RankReport.cache, Status.cache_root / tier_domains), Tokens.cached, RankLoad.tiers;
5: RankLoad.spec_verifications / spec_accepted_at, KVHeader.drafts)."""

TokenIds = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(min_length=1)]
Seed = int | None
"""In [-2**63, 2**64), as torch.Generator.manual_seed takes it (the HTTP front checks the range)."""


class Message(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    """A wire message; its tag (the "op" field) is the class's `tag`."""


# router -> leader -------------------------------------------------------------------------------------------
class Hello(Message, tag="hello"):
    version: int


class _Request(Message):
    rid: str
    prompt: TokenIds
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    params: SamplingParams = SamplingParams()
    seed: Seed = None
    ignore_eos: bool = False


class Generate(_Request, tag="generate"):
    """Both phases on a colocated instance."""


class Reserve(_Request, tag="reserve"):
    """Pages on a decode rank for a prompt that prefill will ship; the leader answers Reserved (or Error)."""

    exclude: list[str] = []
    """KV addresses of decode ranks an earlier attempt failed on: avoided when another rank fits."""


class Prefill(Message, tag="prefill"):
    """Run the prompt, sample its first token, ship its KV into the decode rank's reservation `kv`."""

    rid: str
    prompt: TokenIds
    kv: KVTarget
    params: SamplingParams = SamplingParams()
    seed: Seed = None


class Abort(Message, tag="abort"):
    rid: str
    writer: bool = True
    """Whether a prefill instance was asked to write the attempt's KV (False: nothing can write into its
    reserved decode pages, which are free at once)."""


Command = Union[Generate, Reserve, Prefill, Abort]
"""What a leader hands a rank (the routers' request messages)."""
RouterMessage = Union[Hello, Generate, Reserve, Prefill, Abort]


# leader -> router -------------------------------------------------------------------------------------------
class TierFigures(msgspec.Struct, forbid_unknown_fields=True):
    """A rank's KV cache figures since start-up, for the routers' /metrics: where its prompt tokens came from
    and what the tiers below its device pages did (moe_pd.kvcache.tiers)."""

    hit_tokens: dict[str, int] = {}
    """Prompt tokens served from a cache, by source: device, dram, disk."""
    promoted_pages: dict[str, int] = {}
    """Pages copied up into device pages, by the tier they came from."""
    promotions: int = 0
    promotion_misses: int = 0
    """Pages found at admission that did not arrive intact (recomputed)."""
    load_seconds: float = 0.0
    """Summed promotion latency (start to the pages being usable); / promotions: the mean."""
    demoted_pages: dict[str, int] = {}
    """Pages this rank wrote down into each tier (dram, disk)."""
    corrupt: int = 0
    """Disk entries found damaged (checksum, size, header) and dropped as misses."""
    bytes: dict[str, int] = {}
    """Bytes each tier holds (the whole node's DRAM pool, the whole disk directory)."""
    entries: dict[str, int] = {}


class RankLoad(msgspec.Struct, forbid_unknown_fields=True):
    """What a rank reports every iteration: its leader balances on it, routers see it in Status."""

    rank: int
    kv_used: int
    kv_total: int
    running: int
    """Requests holding a batch slot or receiving their KV."""
    waiting: int
    queued_tokens: int
    """Prompt tokens admitted and not yet computed."""
    max_running: int
    address: str = ""
    """Decode ranks: where prefill ships this rank's KV."""
    in_transfer: int = 0
    """Requests whose KV is on the wire (sent by prefill, or expected by decode)."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache since start-up."""
    aborted: int = 0
    """Requests aborted since start-up."""
    pid: int = 0
    """The rank's process id."""
    reserved: int = 0
    """Decode ranks: requests holding pages reserved for KV that has not arrived yet."""
    transfers: dict[str, int] = {}
    """Prefill ranks: KV transfers finished since start-up, by final state (done, timed_out, rejected,
    failed, cancelled: aborted while on the wire)."""
    kv_backend: str = ""
    """The rank's KV transfer backend (zmq, nixl; '' on colocated ranks)."""
    spec_verifications: int = 0
    """Speculative decoding: drafts verified (one per request and step) since start-up."""
    spec_accepted_at: list[int] = []
    """Speculative decoding: per draft position, the verifications that accepted it, since start-up."""
    tiers: TierFigures | None = None
    """The KV cache's figures (refreshed about once a second)."""


class EplbStatus(msgspec.Struct):
    """An instance's expert load balancer, for the routers' /metrics (EplbManager.metrics)."""

    balancedness: dict[str, list[float]]
    """Mean / max rows received per rank, per MoE layer: over the last window ("window") and step ("step")."""
    rebalances: int
    checks: int
    bytes_moved: int


class Status(Message, tag="status"):
    version: int
    service: str
    role: str
    block_size: int
    ranks: list[RankLoad] = []
    eplb: EplbStatus | None = None
    draining: bool = False
    """The instance got SIGTERM: it finishes what it holds and takes nothing new (routers send it nothing)."""
    cache_root: bytes = b""
    """The model identity digest the instance's page keys chain from (moe_pd.kvcache.tiers.identity)."""
    tier_domains: dict[str, str] = {}
    """Where its tiers live ("dram", "disk" -> a name every process sharing that tier gives it alike)."""


class CacheEvents(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """Pages one cache stored and removed, by their 16-byte chained keys (vLLM's KV events, BlockStored and
    BlockRemoved, which Dynamo's KV router learns from)."""

    tier: str
    """device (a rank's pages), dram or disk (the node's tiers of the instance's Status.tier_domains)."""
    stored: list[bytes] = []
    removed: list[bytes] = []


class Cached(Message, tag="cached"):
    """What the instance's caches hold, as it learned it from its ranks: changes since the last message, or
    with `snapshot` everything (sent to a router that says Hello, in chunks: the first one replaces what
    the router knew of this instance)."""

    events: list[CacheEvents]
    snapshot: bool = False


class Reserved(Message, tag="reserved"):
    rid: str
    kv: KVTarget
    """Where prefill ships the KV (for the Prefill message); `kv.address` names the decode rank."""
    rank: int


class Tokens(Message, tag="tokens"):
    rid: str
    ids: list[int]
    finished: bool
    reason: str | None = None
    logprobs: list[Logprob] | None = None
    """The tail of `ids`' log-probabilities, when asked (a decode rank's first Tokens lacks the first token's:
    prefill sampled it, and Prefilled carries it)."""
    prompt_logprobs: list[Logprob | None] | None = None
    """Colocated, with the first token: the prompt's log-probabilities, when asked."""
    cached: int | None = None
    """With the first token: prompt tokens served from a cache (OpenAI's usage.prompt_tokens_details)."""


class Prefilled(Message, tag="prefilled"):
    """Prefill is done with the request: its KV transfer ended in `state` (done, or why not)."""

    rid: str
    state: str
    detail: str = ""
    nbytes: int = 0
    latency_s: float = 0.0
    logprobs: list[Logprob] | None = None
    """The first token's log-probability, when asked."""
    prompt_logprobs: list[Logprob | None] | None = None
    """The prompt's log-probabilities (echo), when asked."""
    backend: str = ""
    """The transfer backend that moved it."""


class Error(Message, tag="error"):
    rid: str
    message: str
    retry: bool = False
    """Another instance or rank may succeed (no pages, a failed transfer); False: the request itself is bad."""
    status: int = 400
    """The HTTP status the router answers with when it gives up."""


Event = Union[Reserved, Tokens, Prefilled, Error]
"""What a rank reports about its requests (forwarded by the leader to the router that sent them)."""
LeaderMessage = Union[Status, Reserved, Tokens, Prefilled, Error, Cached]
FINAL = (Prefilled, Error)
"""Events after which the leader forgets the request (so do Tokens with finished=True)."""


def is_final(event: Message) -> bool:
    return isinstance(event, FINAL) or (isinstance(event, Tokens) and event.finished)


# rank -> ranks ----------------------------------------------------------------------------------------------
class RankReport(msgspec.Struct, forbid_unknown_fields=True):
    """One rank's part of an iteration's exchange (ControlPlane). Whether the instance steps is decided from
    these facts only, so every rank decides the same."""

    rank: int
    load: RankLoad
    events: list[Event] = []
    busy: bool = False
    """The rank's engine has requests to run."""
    stop: bool = False
    """The rank was asked to stop (SIGTERM/SIGINT): the instance drains."""
    leave: bool = False
    """The leader's only: drained (or out of time), every rank leaves the loop now."""
    commands: dict[int, list[Command]] = {}
    """The leader's only: the commands for each rank, applied by every rank after the exchange."""
    cache: list[CacheEvents] = []
    """What the rank's device cache and the tier writes it made stored and removed since its last report."""


# encoding ---------------------------------------------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()
_router_decoder = msgspec.msgpack.Decoder(RouterMessage)
_leader_decoder = msgspec.msgpack.Decoder(LeaderMessage)
_report_decoder = msgspec.msgpack.Decoder(RankReport)


class _AnyRid(msgspec.Struct):
    rid: str = ""


_rid_decoder = msgspec.msgpack.Decoder(_AnyRid)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def broken_request_id(raw: bytes) -> str:
    """The request id a malformed message names, if it names one (so that request can be failed alone)."""
    try:
        return _rid_decoder.decode(raw).rid
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


def decode_router_message(raw: bytes) -> RouterMessage | Error | None:
    """A router's message; a broken one that names its request becomes an Error to answer it with; anything
    else broken is logged and None."""
    try:
        return _router_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        rid = broken_request_id(raw)
        log.warning("malformed message from a router%s: %s", f" for request {rid}" if rid else "", exc)
        return Error(rid, f"malformed request: {exc}", retry=False, status=400) if rid else None


def decode_leader_message(raw: bytes, source: str) -> LeaderMessage | None:
    try:
        return _leader_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("dropped a malformed message from %s: %s", source, exc)
        return None


def decode_report(raw: bytes, rank: int) -> RankReport | None:
    """A rank's report; None (logged) when it does not decode. Every rank decodes the same bytes, so every
    rank drops the same reports and still decides the same."""
    try:
        return _report_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("rank %d's control report does not decode (ranks of different versions?): %s", rank, exc)
        return None
