"""KV cache tiers below the device pages: the node's host DRAM pool and a disk directory (docs/kv_tiers.md).

Import the parts directly; only manager.py needs torch."""
