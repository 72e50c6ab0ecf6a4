"""DeepSeek-V3 / V2 architecture, single-device math, and the checkpoint loader."""
