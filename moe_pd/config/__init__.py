"""Typed configuration: one dataclass schema per component, registered in Hydra's ConfigStore."""

from moe_pd.config.errors import ConfigError
from moe_pd.config.generate import GenerateConfig
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScalingConfig
from moe_pd.config.parallel import ParallelConfig
from moe_pd.config.runtime import RuntimeConfig
from moe_pd.config.sampling import SamplingConfig

__all__ = [
    "ConfigError", "GenerateConfig", "KVCacheConfig", "ModelConfig", "ParallelConfig",
    "RopeScalingConfig", "RuntimeConfig", "SamplingConfig", "SUPPORTED_ARCHITECTURES",
]
