"""Registers every schema in Hydra's ConfigStore; YAML under conf/ names a schema then lists deltas."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe_pd.config.eplb import EplbConfig
from moe_pd.config.errors import ConfigError
from moe_pd.config.generate import GenerateConfig
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.overlap import OverlapConfig, ProfileConfig
from moe_pd.config.parallel import ParallelConfig
from moe_pd.config.planner import HardwareConfig, PlannerConfig
from moe_pd.config.runtime import RuntimeConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.config.serve import RouterConfig, ServeConfig, ServiceConfig
from moe_pd.config.testing import TestingConfig

SCHEMAS = {
    ("", "generate_schema"): GenerateConfig,
    ("", "serve_schema"): ServeConfig,
    ("", "service_schema"): ServiceConfig,
    ("", "router_schema"): RouterConfig,
    ("", "planner_schema"): PlannerConfig,
    ("model", "model_schema"): ModelConfig,
    ("parallel", "parallel_schema"): ParallelConfig,
    ("sampling", "sampling_schema"): SamplingConfig,
    ("kvcache", "kvcache_schema"): KVCacheConfig,
    ("runtime", "runtime_schema"): RuntimeConfig,
    ("eplb", "eplb_schema"): EplbConfig,
    ("overlap", "overlap_schema"): OverlapConfig,
    ("profile", "profile_schema"): ProfileConfig,
    ("hardware", "hardware_schema"): HardwareConfig,
    ("testing", "testing_schema"): TestingConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        if group:
            cs.store(group=group, name=name, node=node)
        else:
            cs.store(name=name, node=node)


def to_config(cfg: DictConfig):
    """Instantiates the schema dataclasses, which runs every __post_init__ check."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf wraps errors raised inside __post_init__
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def model_preset(name: str) -> ModelConfig:
    """A model preset from conf/model/ (deepseek_v3, deepseek_v2_lite, tiny, ...) as a checked ModelConfig."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        return to_config(compose("generate", overrides=[f"model={name}"])).model
    with initialize_config_module("moe_pd.conf", version_base=None):
        return to_config(compose("generate", overrides=[f"model={name}"])).model
