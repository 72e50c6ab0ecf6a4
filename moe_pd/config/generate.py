"""Top-level schema of `python -m moe_pd.generate`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moe_pd.config.engine import RankGroupConfig
from moe_pd.config.errors import ConfigError, check
from moe_pd.config.sampling import SamplingConfig


@dataclass
class GenerateConfig(RankGroupConfig):
    """Offline generation: a batch of prompts in, one JSON line per prompt out."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Token selection."""
    prompts: list[str] = field(default_factory=list)
    """Text prompts."""
    prompt_ids: list[list[int]] = field(default_factory=list)
    """Prompts given as token ids (used after `prompts`)."""
    prompts_file: Optional[str] = None
    """JSON-lines file; each line {"prompt": str} or {"prompt_ids": [int, ...]}."""
    max_batch_size: int = 64
    """Sequences decoded together in one step."""
    output: Optional[str] = None
    """File for the JSON lines; None writes them to stdout."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.max_batch_size > 0, "max_batch_size", self.max_batch_size, "must be > 0")
        for i, ids in enumerate(self.prompt_ids):
            if not all(isinstance(t, int) for t in ids):
                raise ConfigError(f"prompt_ids[{i}]: must be a list of integers")
