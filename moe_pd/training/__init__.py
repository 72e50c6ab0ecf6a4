"""Training the repository's tiny DeepSeek-V3-shaped checkpoint on a CPU (moe_pd/assets/tiny_dsv3/):
the deterministic corpus, its tokenizer, the training loop with the MTP objective. See docs/tiny_checkpoint.md."""
