"""The P:D cluster planner: per-layer rooflines of a DeepSeek-V3-architecture model on a given accelerator,
a few efficiency factors fitted once to DeepSeek's day-6 operating point, and the prefill and decode
cluster sizes that follow for a workload. Pure arithmetic: no torch. See docs/planner.md."""
