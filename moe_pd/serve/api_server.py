"""The one-process OpenAI-compatible server (colocated mode: prefill and decode in one engine, no torchrun,
no router): config, model, engine loop, HTTP app; a clean shutdown on SIGINT/SIGTERM.

    python -m moe_pd.serve.api_server port=8000          # tiny model on CPU
    curl localhost:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 8}'
"""

from __future__ import annotations

import asyncio
import logging

import hydra
from aiohttp import web
from omegaconf import DictConfig

from moe_pd.config.errors import ConfigError, exit_on
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.serve import ServeConfig
from moe_pd.config.store import register_configs, to_config
from moe_pd.engine.instance import graphs_wanted
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.engine.tokenizer import load_tokenizer
from moe_pd.log import setup_logging
from moe_pd.model.loader import CheckpointError, build_model
from moe_pd.model.ops import select_ops
from moe_pd.parallel.state import ParallelState
from moe_pd.runtime import resolve_device, resolve_dtype
from moe_pd.serve.engine_loop import EngineLoop
from moe_pd.serve.http_app import build_app, serve_until_signalled

log = logging.getLogger("moe_pd.serve")


def make_server(cfg: ServeConfig) -> tuple[web.Application, EngineLoop]:
    model_cfg = resolve_model_config(cfg.model)
    device, dtype = resolve_device(cfg.runtime), resolve_dtype(cfg.runtime)
    model = build_model(model_cfg, device=device, dtype=dtype, ops=select_ops(cfg.runtime.kernels, device),
                        fp8_experts=cfg.runtime.fp8_experts, mtp=cfg.speculative.num_draft_tokens > 0)
    engine = LLMEngine(model, cfg.kvcache, cfg.max_num_seqs, cfg.max_num_batched_tokens, device, overlap=cfg.overlap,
                       decode_graphs=graphs_wanted(cfg.runtime, ParallelState.single(1, device), model),
                       num_draft_tokens=cfg.speculative.num_draft_tokens)
    loop = EngineLoop(engine).start()
    return build_app(loop, load_tokenizer(model_cfg), cfg.served_model_name, cfg.max_tokens_limit,
                     model_cfg.vocab_size, model_cfg.max_position_embeddings), loop


async def serve(cfg: ServeConfig) -> None:
    app, loop = make_server(cfg)
    try:
        await serve_until_signalled(app, cfg.host, cfg.port, f"moe_pd serving {cfg.served_model_name} at {{url}}",
                                    cfg.drain_timeout_s)
    finally:
        loop.stop()


@hydra.main(config_path="pkg://moe_pd.conf", config_name="serve", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    with exit_on(ConfigError, CheckpointError):
        cfg = to_config(dict_cfg)
        setup_logging(cfg.runtime.log_level)
        asyncio.run(serve(cfg))


register_configs()

if __name__ == "__main__":
    main()
