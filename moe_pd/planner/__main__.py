"""`python -m moe_pd.planner`: how big the prefill and decode clusters must be, and what bounds each.

    python -m moe_pd.planner                                   # DeepSeek-V3 on H800, day-6 traffic
    python -m moe_pd.planner hardware=h200 workload.cache_hit_rate=0 workload.request_rate=200
    python -m moe_pd.planner model=path model.path=/ckpt output=json

Every knob is a typed field of moe_pd.config.planner.PlannerConfig; `--cfg job` prints the composed config.
With output=json the last line of stdout is one JSON object (docs/planner.md lists its fields).
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from moe_pd.config.errors import ConfigError, exit_on
from moe_pd.config.store import register_configs, to_config
from moe_pd.planner.plan import PlanError, plan
from moe_pd.planner.report import to_json, to_table


@hydra.main(config_path="pkg://moe_pd.conf", config_name="planner", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    with exit_on(ConfigError, PlanError):
        cfg = to_config(dict_cfg)
        result = plan(cfg)
    print(to_table(cfg, result))
    if cfg.output == "json":
        print(json.dumps(to_json(cfg, result)))


register_configs()

if __name__ == "__main__":
    main()
