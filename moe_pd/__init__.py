"""moe_pd: prefill/decode disaggregated serving for DeepSeek-V3-style MoE models."""
