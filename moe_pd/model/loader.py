"""Checkpoint loading: HF safetensors (bf16/fp32 or FP8 block-scaled) or seeded random weights.

Both are TensorSources keyed by HF checkpoint names, so the tiny random model and a real checkpoint
go through the same code. Reads are lazy per tensor (safe_open), and a rank reads only the routed
experts it holds, by global expert id. Layers at or past `num_hidden_layers` (DeepSeek's MTP modules) load
into `model.mtp` when it was built (build_model(mtp=True), names mapped by moe_pd.model.mtp.checkpoint_name)
and are skipped with a logged message otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from moe_pd.config.hf import fp8_block_size
from moe_pd.config.model import ModelConfig
from moe_pd.fp8 import FP8_DTYPE, dequantize_block_fp8, quantize_block_fp8
from moe_pd.model.experts import RoutedExperts
from moe_pd.model.gate import Gate
from moe_pd.model.mtp import checkpoint_name
from moe_pd.model.transformer import DeepseekForCausalLM, ExpertIds
from moe_pd.parallel.dispatch.base import Dispatcher

log = logging.getLogger(__name__)

_EXPERT_PARAM = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_EXPERT_SCALE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up|down)_scale$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model: the message names the tensor and the file."""


class TensorSource(Protocol):
    """`get` returns a tensor in full precision. A source may also offer `get_fp8(name, shape)`: the tensor
    as stored in FP8 e4m3 with fp32 128x128 block scales, or None when it is not stored so (see fp8_blocks)."""

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor: ...
    def names(self) -> list[str]: ...


def fp8_blocks(source: TensorSource, name: str, shape: tuple[int, ...],
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale per 128x128 block): as the checkpoint stores them (bit for bit) when it does,
    else quantised from the full-precision tensor on `device` (the target's: a GPU quantises fast)."""
    get_fp8 = getattr(source, "get_fp8", None)
    stored = get_fp8(name, shape) if get_fp8 is not None else None
    return stored if stored is not None else quantize_block_fp8(source.get(name, shape).to(device))


class RandomSource:
    """Deterministic random weights: each tensor from its own generator seeded by (seed, name), so any
    rank that builds any subset of the model gets the same values on any machine."""

    def __init__(self, seed: int, std: float) -> None:
        self.seed, self.std = seed, std

    def names(self) -> list[str]:
        return []

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed((zlib.crc32(name.encode()) << 16) ^ self.seed)
        x = torch.randn(shape, generator=gen)
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * x
        if name.endswith("e_score_correction_bias"):
            return 0.01 * x
        return self.std * x


class SafetensorsSource:
    """A directory of *.safetensors (optionally with model.safetensors.index.json)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        self.file_of: dict[str, str] = {}
        if index.is_file():
            with open(index) as f:
                self.file_of = dict(json.load(f)["weight_map"])
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
            for file in files:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        self.file_of[key] = file.name
        self.block = self._block_size()
        self._handles: dict[str, object] = {}

    def _block_size(self) -> tuple[int, int]:
        cfg_file = self.path / "config.json"
        block = fp8_block_size(json.loads(cfg_file.read_text())) if cfg_file.is_file() else None
        return block or (128, 128)

    def names(self) -> list[str]:
        return [n for n in self.file_of if not n.endswith("_scale_inv")]

    def _handle(self, name: str):
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file]

    def _read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _stored(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tensor as stored, its scale_inv when it is FP8), the shape checked."""
        if name not in self.file_of:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name!r} is missing")
        tensor, scale = self._read(name), None
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {self.file_of[name]} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(shape)}")
        if tensor.dtype == FP8_DTYPE:
            scale_name = name.replace(".weight", ".weight_scale_inv")
            if scale_name not in self.file_of:
                raise CheckpointError(f"tensor {name!r} in {self.file_of[name]} is FP8 but {scale_name!r} is missing")
            scale = self._read(scale_name)
        return tensor, scale

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor, scale = self._stored(name, shape)
        if scale is None:
            return tensor
        try:
            return dequantize_block_fp8(tensor, scale, self.block)
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r} in {self.file_of[name]}: {e}") from None

    def get_fp8(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored FP8 blocks when the checkpoint has them in 128x128 blocks (DeepSeek-V3's), else None
        (decided from the header, so the caller's full-precision read is the only one)."""
        if self.block != (128, 128) or name not in self.file_of or \
                self._handle(name).get_slice(name).get_dtype() != "F8_E4M3":
            return None
        tensor, scale = self._stored(name, shape)
        want = (-(-shape[0] // 128), -(-shape[1] // 128))
        if tuple(scale.shape) != want:
            raise CheckpointError(f"tensor {name!r} in {self.file_of[name]}: scale_inv shape {tuple(scale.shape)}, "
                                  f"expected {want} for 128x128 blocks")
        return tensor, scale.float()


def expert_names(prefix: str, kind: str, expert_id: int) -> list[str]:
    if kind == "gate_up_proj":
        return [f"{prefix}.{expert_id}.gate_proj.weight", f"{prefix}.{expert_id}.up_proj.weight"]
    return [f"{prefix}.{expert_id}.down_proj.weight"]


def load_weights(model: DeepseekForCausalLM, source: TensorSource) -> None:
    """Fills every parameter and persistent buffer of `model` from `source`, by checkpoint name. A tensor
    the model shares (the MTP modules' embedding and head are the main model's) is filled once; the
    checkpoint's own copy, when it has one, must hold the same values."""
    cfg = model.cfg
    targets = model.state_dict(keep_vars=True)
    if cfg.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    stored = set(source.names())
    filled: dict[int, str] = {}
    started, done = time.monotonic(), 0
    with torch.no_grad():
        for name, target in targets.items():
            ckpt = checkpoint_name(name, cfg)
            match = _EXPERT_PARAM.match(ckpt)
            if match:
                _load_experts(model.get_submodule(name.rsplit(".", 1)[0]), match[1], match[2], source)
            elif _EXPERT_SCALE.match(ckpt):
                continue  # filled with its weight
            elif target.numel() and target.data_ptr() in filled:
                _check_shared_copy(source, ckpt, target, filled[target.data_ptr()], stored)
            else:
                target.copy_(source.get(ckpt, tuple(target.shape)))
                filled[target.data_ptr()] = ckpt
            done += 1
            if time.monotonic() - started > 10 and done % 100 == 0:
                log.info("loaded %d/%d tensors (%.0f s)", done, len(targets), time.monotonic() - started)
    _report_unused(cfg, source, cfg.num_hidden_layers + len(model.mtp))


def _check_shared_copy(source: TensorSource, name: str, target: torch.Tensor, loaded_as: str, stored: set) -> None:
    if name not in stored:
        return
    if not torch.equal(source.get(name, tuple(target.shape)).to(target), target):
        raise CheckpointError(f"tensor {name!r} differs from {loaded_as!r}: moe_pd shares the MTP module's "
                              f"embedding and output head with the main model's, as DeepSeek-V3 does")


def _load_experts(experts: RoutedExperts, prefix: str, kind: str, source: TensorSource) -> None:
    """One stacked expert weight (gate_up_proj: gate rows, then up rows), slot by slot; FP8 experts take the
    blocks and their scales (fp8_blocks)."""
    weight = getattr(experts, kind)
    scale = None if experts.scales is None else experts.scales[kind == "down_proj"]
    for slot, gid in enumerate(experts.expert_ids):
        names = expert_names(prefix, kind, gid)
        shape = (weight.shape[1] // len(names), weight.shape[2])
        if scale is None:
            weight[slot].copy_(torch.cat([source.get(n, shape) for n in names]))
        else:
            pairs = [fp8_blocks(source, n, shape, weight.device) for n in names]
            weight[slot].copy_(torch.cat([q for q, _ in pairs]))
            scale[slot].copy_(torch.cat([s for _, s in pairs]))


def _report_unused(cfg: ModelConfig, source: TensorSource, first_unused_layer: int) -> None:
    mtp_layers: dict[int, int] = defaultdict(int)
    for name in source.names():
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= first_unused_layer:
            mtp_layers[int(m.group(1))] += 1
    if mtp_layers:
        log.info("skipping %d tensors of layers %s (multi-token prediction, not built: build_model(mtp=True) "
                 "loads it)", sum(mtp_layers.values()), sorted(mtp_layers))


def build_model(
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    expert_ids: ExpertIds | None = None,
    dispatcher: Dispatcher | None = None,
    source: TensorSource | None = None,
    ops=None,
    fp8_experts: bool = False,
    mtp: bool = False,
) -> DeepseekForCausalLM:
    """Builds the model without initialising memory twice, then loads every tensor.

    `source` defaults to the checkpoint at cfg.path, or seeded random weights when it is None. `ops`
    (moe_pd.model.ops.select_ops) picks kernels or torch references; None keeps the references.
    `fp8_experts` keeps the routed experts in FP8 with 128x128 block scales: an FP8 checkpoint's blocks as
    stored, other weights quantised on load (fp8_blocks). `mtp` also builds and loads the checkpoint's MTP
    modules (model.mtp, their experts placed by `expert_ids` like every MoE layer's).
    """
    if mtp and cfg.num_nextn_predict_layers == 0:
        raise CheckpointError(f"{cfg.path or 'the model'} has no MTP layers (num_nextn_predict_layers=0)")
    if source is None:
        source = SafetensorsSource(cfg.path) if cfg.path else RandomSource(cfg.init_seed, cfg.init_std)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg, expert_ids, dispatcher, cfg.num_nextn_predict_layers if mtp else 0)
    model = model.to_empty(device=device).to(dtype)
    for module in model.modules():
        if isinstance(module, Gate):  # routing stays fp32, as in DeepSeek's and transformers' code
            module.float()
    model.model.rotary.reset_parameters()
    if fp8_experts:
        for module in model.modules():
            if isinstance(module, RoutedExperts):
                module.allocate_fp8()
    load_weights(model, source)
    if ops is not None:
        model.use_ops(ops)
    return model.eval().requires_grad_(False)


def save_checkpoint(model: DeepseekForCausalLM, path: str | Path) -> Path:
    """Writes `model` (holding every expert) as an HF checkpoint: config.json + model.safetensors with
    per-expert tensor names, loadable by this loader and (unquantised) by transformers. FP8 experts are
    written as DeepSeek-V3 writes them: e4m3 weights, `weight_scale_inv` per 128x128 block, and a
    `quantization_config` in config.json."""
    from safetensors.torch import save_file

    from moe_pd.config.hf import model_config_to_hf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    fp8 = False
    written: set[int] = set()
    for our_name, tensor in model.state_dict().items():
        name = checkpoint_name(our_name, model.cfg)
        match = _EXPERT_PARAM.match(name)
        if _EXPERT_SCALE.match(name):
            continue  # written with its weight
        if not match:  # a shared tensor (the MTP's embedding and head) is written again under its own name
            shared = tensor.data_ptr() in written
            written.add(tensor.data_ptr())
            tensors[name] = tensor.clone() if shared else tensor.contiguous()
            continue
        prefix, kind = match.groups()
        experts = model.get_submodule(our_name.rsplit(".", 1)[0])
        if sorted(experts.expert_ids) != list(range(model.cfg.n_routed_experts)):
            raise ValueError("save_checkpoint needs a model that holds every expert exactly once")
        scale = None if experts.scales is None else experts.scales[kind == "down_proj"]
        fp8 |= scale is not None
        for slot, gid in enumerate(experts.expert_ids):
            names = expert_names(prefix, kind, gid)
            parts = tensor[slot].chunk(len(names), dim=0)
            scales = scale[slot].chunk(len(names), dim=0) if scale is not None else [None] * len(names)
            for part_name, part, part_scale in zip(names, parts, scales):
                tensors[part_name] = part.contiguous()
                if part_scale is not None:
                    tensors[part_name.replace(".weight", ".weight_scale_inv")] = part_scale.contiguous()
    if model.cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model_config_to_hf(model.cfg)
    config["num_nextn_predict_layers"] = len(model.mtp)
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
