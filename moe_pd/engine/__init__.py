"""Request execution: tokenizer, sampler, offline generation (the serving engine builds on these)."""
