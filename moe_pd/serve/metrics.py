"""Prometheus metrics of the HTTP front (the one-process server or the PD router), one registry per app.

Request metrics (TTFT, TPOT, outcomes, tokens) are observed by the HTTP handlers; instance gauges (queue
lengths, KV usage, transfers by final state, speculative decoding's acceptance, the KV cache tiers' figures)
are refreshed from the instances' heartbeats at each scrape, labelled by instance; transfer bytes and latency
come from each finished request's prefill report. Every transfer series carries the backend that moved the
bytes (backend="zmq" or "nixl")."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("moe_pd_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY)
        self.tpot = Histogram("moe_pd_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.requests = Counter("moe_pd_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("moe_pd_generated_tokens", "Generated tokens", registry=r)
        labels = ["instance", "role"]
        self.up = Gauge("moe_pd_instance_up", "1 while the instance answers its heartbeats", labels, registry=r)
        self.running = Gauge("moe_pd_running_requests", "Requests being generated (or receiving KV)", labels,
                             registry=r)
        self.waiting = Gauge("moe_pd_waiting_requests", "Requests queued", labels, registry=r)
        self.kv_usage = Gauge("moe_pd_kv_cache_usage", "Fraction of KV pages in use", labels, registry=r)
        self.kv_pages = Gauge("moe_pd_kv_pages_used", "KV pages in use (all ranks)", labels, registry=r)
        self.transfer_bytes = Counter("moe_pd_kv_transfer_bytes", "KV bytes shipped from prefill to decode, by "
                                      "transfer backend", ["backend"], registry=r)
        self.transfer_seconds = Histogram("moe_pd_kv_transfer_seconds", "KV transfer time, send to answer (zmq) "
                                          "or to the last byte written (nixl)", ["backend"], registry=r,
                                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                   1, 5, 30))
        self.transfers = Gauge("moe_pd_kv_transfers", "KV transfers a prefill instance finished since it started, "
                               "by transfer backend and final state", [*labels, "backend", "state"], registry=r)
        self.eplb_balancedness = Gauge("moe_pd_eplb_balancedness", "Mean / max rows received per rank, per MoE "
                                       "layer, at the last EPLB check: over its window or in its last step",
                                       [*labels, "layer", "scope"], registry=r)
        self.eplb_rebalances = Gauge("moe_pd_eplb_rebalances", "EPLB checks that moved experts since start-up",
                                     labels, registry=r)
        self.eplb_bytes = Gauge("moe_pd_eplb_bytes_moved", "Expert weight bytes EPLB moved between ranks since "
                                "start-up", labels, registry=r)
        self.spec_verifications = Gauge("moe_pd_spec_verifications", "Speculative decoding: drafts verified "
                                        "(one per request and step) since start-up", labels, registry=r)
        self.spec_acceptance_length = Gauge("moe_pd_spec_mean_acceptance_length", "Speculative decoding: tokens a "
                                            "verification emits on average (accepted drafts + 1)", labels,
                                            registry=r)
        self.spec_acceptance_rate = Gauge("moe_pd_spec_acceptance_rate", "Speculative decoding: share of "
                                          "verifications that accepted the draft at this position (1 = first)",
                                          [*labels, "position"], registry=r)
        self.retries = Counter("moe_pd_retries", "Request attempts run again (a failed transfer, a lost instance: "
                               "re-run or migrated with the tokens already streamed)", registry=r)
        self.reserved = Gauge("moe_pd_kv_reserved_requests", "Decode reservations waiting for their KV", labels,
                              registry=r)
        self.in_transfer = Gauge("moe_pd_kv_requests_in_transfer", "Requests whose KV is on the wire (sent by "
                                 "prefill, or expected by decode)", labels, registry=r)
        self.router_waiting = Gauge("moe_pd_router_waiting_requests", "Requests waiting at the router for room "
                                    "(back-pressure)", registry=r)
        self.router_attempts = Gauge("moe_pd_router_live_attempts", "Request attempts the router has in flight",
                                     registry=r)
        tiered = [*labels, "tier"]
        self.cache_hits = Gauge("moe_pd_kv_cache_hit_tokens", "Prompt tokens served from a cache since start-up, by "
                                "source: device (prefix cache), dram, disk", [*labels, "source"], registry=r)
        self.tier_bytes = Gauge("moe_pd_kv_tier_bytes", "Bytes a KV tier holds (the node's DRAM pool, the whole disk "
                                "directory)", tiered, registry=r)
        self.tier_entries = Gauge("moe_pd_kv_tier_entries", "Pages a KV tier holds", tiered, registry=r)
        self.tier_promoted = Gauge("moe_pd_kv_tier_promoted_pages", "Pages promoted from a tier into device pages "
                                   "since start-up", tiered, registry=r)
        self.tier_demoted = Gauge("moe_pd_kv_tier_demoted_pages", "Pages written down into a tier since start-up",
                                  tiered, registry=r)
        self.tier_promotions = Gauge("moe_pd_kv_tier_promotions", "Promotions (one per admitted request with a tier "
                                     "hit) since start-up", labels, registry=r)
        self.tier_misses = Gauge("moe_pd_kv_tier_promotion_misses", "Pages found in a tier that did not arrive intact "
                                 "(recomputed)", labels, registry=r)
        self.tier_load_seconds = Gauge("moe_pd_kv_tier_load_seconds_sum", "Summed promotion latency (start to pages "
                                       "usable); divided by moe_pd_kv_tier_promotions: the mean", labels, registry=r)
        self.tier_corrupt = Gauge("moe_pd_kv_tier_corrupt_entries", "Disk tier entries found damaged and dropped as "
                                  "misses since start-up", labels, registry=r)

    def router(self, waiting: int, attempts: int) -> None:
        self.router_waiting.set(waiting)
        self.router_attempts.set(attempts)

    def instance(self, name: str, role: str, up: bool, ranks: list[dict], eplb: dict | None = None) -> None:
        """One instance's gauges from its latest status (ranks: RankLoad dicts; eplb: EplbManager.metrics())."""
        if eplb:
            self.eplb_rebalances.labels(name, role).set(eplb["rebalances"])
            self.eplb_bytes.labels(name, role).set(eplb["bytes_moved"])
            for scope, values in eplb["balancedness"].items():
                for layer, value in enumerate(values):
                    self.eplb_balancedness.labels(name, role, str(layer), scope).set(value)
        used = sum(x["kv_used"] for x in ranks)
        total = sum(x["kv_total"] for x in ranks)
        self.up.labels(name, role).set(int(up))
        self.running.labels(name, role).set(sum(x["running"] for x in ranks))
        self.waiting.labels(name, role).set(sum(x["waiting"] for x in ranks))
        self.kv_pages.labels(name, role).set(used)
        self.reserved.labels(name, role).set(sum(x.get("reserved", 0) for x in ranks))
        self.in_transfer.labels(name, role).set(sum(x.get("in_transfer", 0) for x in ranks))
        self.kv_usage.labels(name, role).set(used / total if total else 0.0)
        self._speculation(name, role, ranks)
        states: dict[tuple[str, str], int] = {}
        for rank in ranks:
            for state, count in rank.get("transfers", {}).items():
                key = (rank.get("kv_backend", ""), state)
                states[key] = states.get(key, 0) + count
        for (backend, state), count in states.items():
            self.transfers.labels(name, role, backend, state).set(count)
        self._tiers(name, role, [x["tiers"] for x in ranks if x.get("tiers")])

    def _speculation(self, name: str, role: str, ranks: list[dict]) -> None:
        """Acceptance of the instance's ranks together (only instances that speculate report it)."""
        verified = sum(x.get("spec_verifications", 0) for x in ranks)
        accepted_at = [sum(col) for col in zip(*(x["spec_accepted_at"] for x in ranks if x.get("spec_accepted_at")))]
        if not accepted_at:
            return
        self.spec_verifications.labels(name, role).set(verified)
        self.spec_acceptance_length.labels(name, role).set(1 + sum(accepted_at) / verified if verified else 0.0)
        for position, count in enumerate(accepted_at, 1):
            self.spec_acceptance_rate.labels(name, role, str(position)).set(count / verified if verified else 0.0)

    def _tiers(self, name: str, role: str, figures: list[dict]) -> None:
        """The ranks' TierFigures: counts summed over ranks, sizes (the node's, seen alike by every rank) the
        largest any rank reports."""
        if not figures:
            return
        for gauge, key, combine in ((self.cache_hits, "hit_tokens", sum), (self.tier_promoted, "promoted_pages", sum),
                                    (self.tier_demoted, "demoted_pages", sum), (self.tier_bytes, "bytes", max),
                                    (self.tier_entries, "entries", max)):
            for label in {k for f in figures for k in f[key]}:
                gauge.labels(name, role, label).set(combine(f[key].get(label, 0) for f in figures))
        for gauge, key in ((self.tier_promotions, "promotions"), (self.tier_misses, "promotion_misses"),
                           (self.tier_load_seconds, "load_seconds"), (self.tier_corrupt, "corrupt")):
            gauge.labels(name, role).set(sum(f[key] for f in figures))
