"""Serving: the router and a PD cluster's instances (prefill, decode, colocated), their wire protocol, and the
one-process server; docs/architecture.md walks a request through them."""
