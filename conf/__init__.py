"""Hydra YAML config groups, packaged as moe_pd.conf so `pkg://moe_pd.conf` resolves from any install."""
