"""Runtime schema: device, precision, logging."""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.config.errors import ConfigError, check_choice

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class RuntimeConfig:
    """Where and in which precision the model runs."""

    device: str = "cpu"
    """'cpu', 'cuda' or 'auto' (cuda when available)."""
    dtype: str = "float32"
    """Activation and weight dtype: float32 (CPU default), bfloat16 or float16."""
    log_level: str = "INFO"
    """Python logging level of rank 0 (other ranks log warnings and errors only)."""
    kernels: str = "auto"
    """Hot operations: auto (Triton kernels on CUDA, torch references on CPU), torch, or triton (on CPU
    only under TRITON_INTERPRET=1, for tests)."""
    cuda_graphs: bool = False
    """Decode steps as CUDA graphs at bucketed batch sizes (one process, EP = 1, Triton kernels)."""
    fp8_experts: bool = False
    """Routed experts kept in FP8 e4m3 with 128x128 block scales (an FP8 checkpoint's blocks as stored, other
    weights quantised on load) and run through the FP8 grouped GEMM; activations quantised per token and 128
    channels. Online EPLB moves the blocks with their scales."""

    def __post_init__(self) -> None:
        check_choice("runtime.device", self.device, ("cpu", "cuda", "auto"))
        check_choice("runtime.dtype", self.dtype, DTYPES)
        check_choice("runtime.log_level", self.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))
        check_choice("runtime.kernels", self.kernels, ("auto", "torch", "triton"))
        if self.cuda_graphs and self.kernels == "torch":
            raise ConfigError("runtime.cuda_graphs needs the Triton kernels: set runtime.kernels=auto or triton")
