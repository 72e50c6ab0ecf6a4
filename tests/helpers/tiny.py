"""The tiny preset as a ModelConfig, composed from conf/ exactly as the CLI does."""

from hydra import compose, initialize_config_module

from moe_pd.config.store import register_configs, to_config

register_configs()
with initialize_config_module("moe_pd.conf", version_base=None):
    TINY = to_config(compose("generate")).model
