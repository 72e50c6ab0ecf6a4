"""One instance of a PD cluster (prefill, decode or colocated), run by every rank of a torchrun job:

    torchrun --nproc-per-node=2 -m moe_pd.serve.service --config-name prefill port=9100
    torchrun --nproc-per-node=4 -m moe_pd.serve.service --config-name decode port=9200

Start-up and shutdown only: the rank group (shared with moe_pd.generate: moe_pd.engine.instance), the
engine, this rank's role (moe_pd.serve.rank), the leader on rank 0 (moe_pd.serve.leader) and the loop
(moe_pd.serve.instance). The messages are moe_pd.serve.protocol's.
"""

from __future__ import annotations

import logging
import signal

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_pd.config.errors import ConfigError, exit_on
from moe_pd.config.serve import ServiceConfig
from moe_pd.config.store import register_configs, to_config
from moe_pd.engine.instance import graphs_wanted, rank_group
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.log import setup_logging
from moe_pd.model.loader import CheckpointError
from moe_pd.parallel.control_plane import ControlPlane
from moe_pd.serve.instance import serve_rank
from moe_pd.serve.leader import Leader
from moe_pd.serve.rank import make_rank

log = logging.getLogger("moe_pd.serve.service")


def run(cfg: ServiceConfig, run_dir: str | None = None) -> None:
    stop = {"requested": False}

    def request_stop(*_):
        stop["requested"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    with rank_group(cfg, cfg.role, run_dir) as group:
        state = group.state
        engine = LLMEngine(group.model, cfg.kvcache, cfg.max_num_seqs, cfg.max_num_batched_tokens, state.device,
                           group.sync, cfg.overlap, hold_finished_pages=cfg.role == "prefill",
                           decode_graphs=graphs_wanted(cfg.runtime, state, group.model) and cfg.role != "prefill",
                           num_draft_tokens=cfg.speculative.num_draft_tokens)
        worker = make_rank(cfg, engine, state.rank)
        leader = None
        if state.rank == 0:
            leader = Leader(cfg, state.world_size, f"{cfg.role}@{cfg.host}:{cfg.port}", engine.cache.block_size,
                            engine.max_context, engine.identity.digest,
                            engine.tiers.domains if engine.tiers is not None else None)
            leader.eplb_metrics = group.eplb.metrics if group.eplb is not None else None
            print(f"moe_pd {cfg.role} instance of {state.world_size} rank(s) listening at {leader.address}",
                  flush=True)
        try:
            serve_rank(worker, ControlPlane(state.world_size, state.backend), leader, lambda: stop["requested"],
                       cfg.idle_wait_ms)
        finally:
            worker.close()
            engine.close()
            if leader is not None:
                leader.close()
        log.info("%s rank %d stopped after %d engine steps", cfg.role, state.rank, engine.stats.steps)


@hydra.main(config_path="pkg://moe_pd.conf", config_name="prefill", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    with exit_on(ConfigError, CheckpointError):
        cfg = to_config(dict_cfg)
        setup_logging(cfg.runtime.log_level)
        run(cfg, HydraConfig.get().runtime.output_dir)


register_configs()

if __name__ == "__main__":
    main()
