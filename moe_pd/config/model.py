"""Model architecture schema. Field names equal the keys of a checkpoint's config.json.

Defaults are DeepSeek-V3 671B (deepseek-ai/DeepSeek-V3, inference/configs/config_671B.json); presets in
conf/model/ list only their deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moe_pd.config.errors import check, check_choice

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")


@dataclass
class RopeScalingConfig:
    """YaRN context extension, as DeepSeek's config.json spells `rope_scaling` (null = key absent)."""

    type: str = "yarn"
    """Scaling kind; only 'yarn' is supported."""
    factor: float = 40.0
    """Ratio of the extended context to the pre-training context."""
    original_max_position_embeddings: Optional[int] = None
    """Context length used in pre-training; null means max_position_embeddings."""
    beta_fast: float = 32.0
    """Rotations above which dimensions are extrapolated (kept as is)."""
    beta_slow: float = 1.0
    """Rotations below which dimensions are fully interpolated."""
    mscale: Optional[float] = None
    """Numerator coefficient of the cos/sin attention factor (with mscale_all_dim)."""
    mscale_all_dim: Optional[float] = None
    """Coefficient of the softmax-scale correction, squared into the scale; null: no correction."""
    attention_factor: Optional[float] = None
    """Explicit cos/sin factor; null derives it from factor, mscale and mscale_all_dim."""
    truncate: bool = True
    """Round the correction range to whole dimensions."""

    def __post_init__(self) -> None:
        check_choice("model.rope_scaling.type", self.type, ("yarn",))
        check(self.factor >= 1.0, "model.rope_scaling.factor", self.factor, "must be >= 1")
        check(
            self.original_max_position_embeddings is None or self.original_max_position_embeddings > 0,
            "model.rope_scaling.original_max_position_embeddings",
            self.original_max_position_embeddings,
            "must be > 0 or null",
        )


def _deepseek_v3_yarn() -> RopeScalingConfig:
    return RopeScalingConfig(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)


@dataclass
class ModelConfig:
    """DeepSeek-V3 / V2 architecture. `path` set means: read config.json there and load its weights."""

    architecture: str = "DeepseekV3ForCausalLM"
    """One of SUPPORTED_ARCHITECTURES (config.json `architectures[0]`)."""
    path: Optional[str] = None
    """Checkpoint directory (config.json + *.safetensors); None builds random weights from `init_seed`."""
    vocab_size: int = 129280
    """Number of token ids."""
    hidden_size: int = 7168
    """Model width D."""
    intermediate_size: int = 18432
    """Inner width of the dense MLP layers."""
    moe_intermediate_size: int = 2048
    """Inner width F of each routed (and shared) expert."""
    num_hidden_layers: int = 61
    """Decoder layers, MTP layers excluded."""
    num_nextn_predict_layers: int = 1
    """Multi-token-prediction (MTP) modules the checkpoint stores after the decoder layers, as layer indices
    num_hidden_layers, ... (DeepSeek-V3: 1). Built only for speculative decoding (build_model(mtp=True))."""
    first_k_dense_replace: int = 3
    """Leading layers with a dense MLP instead of MoE."""
    num_attention_heads: int = 128
    """Attention heads H."""
    q_lora_rank: Optional[int] = 1536
    """Rank of the query down-projection; None projects queries directly (V2-Lite)."""
    kv_lora_rank: int = 512
    """Width of the compressed KV latent that the cache stores."""
    qk_nope_head_dim: int = 128
    """Per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int = 64
    """Per-head query/key width with rotary embedding (key part shared by all heads)."""
    v_head_dim: int = 128
    """Per-head value width."""
    n_routed_experts: int = 256
    """Routed experts E per MoE layer."""
    n_shared_experts: int = 1
    """Shared experts, fused into one MLP of width n_shared_experts * moe_intermediate_size."""
    num_experts_per_tok: int = 8
    """Routed experts K chosen per token."""
    n_group: int = 8
    """Expert groups for group-limited routing (1 disables the group limit)."""
    topk_group: int = 4
    """Groups a token may route into."""
    scoring_func: str = "sigmoid"
    """Gate score: 'sigmoid' (V3) or 'softmax' (V2)."""
    topk_method: str = "noaux_tc"
    """Expert selection: 'noaux_tc' (V3, bias-corrected groups), 'greedy' or 'group_limited_greedy' (V2)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k weights to sum to 1 before scaling."""
    routed_scaling_factor: float = 2.5
    """Multiplier on the routed experts' weights."""
    hidden_act: str = "silu"
    """Activation of the SwiGLU MLPs; only 'silu'."""
    max_position_embeddings: int = 163840
    """Context length the model serves."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary base."""
    rope_scaling: Optional[RopeScalingConfig] = field(default_factory=_deepseek_v3_yarn)
    """YaRN parameters; None for plain RoPE."""
    rope_interleave: bool = True
    """Rotary pairs are interleaved (x0,x1),(x2,x3) as in DeepSeek's checkpoints; False: halves."""
    tie_word_embeddings: bool = False
    """The lm head reuses the embedding matrix."""
    bos_token_id: Optional[int] = 0
    """Begin-of-sequence id, prepended to text prompts when set."""
    eos_token_id: Optional[int] = 1
    """End-of-sequence id; generation stops on it."""
    init_seed: int = 0
    """Seed of the random weights used when `path` is None (tiny model, benchmarks)."""
    init_std: float = 0.02
    """Standard deviation of those random weights."""

    def __post_init__(self) -> None:
        check_choice("model.architecture", self.architecture, SUPPORTED_ARCHITECTURES)
        check(self.path != "", "model.path", self.path,
              "set it to a checkpoint directory (config.json + *.safetensors)")
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group", "max_position_embeddings",
        ):
            value = getattr(self, name)
            check(value > 0, f"model.{name}", value, "must be > 0")
        check(self.q_lora_rank is None or self.q_lora_rank > 0, "model.q_lora_rank", self.q_lora_rank,
              "must be > 0 or null")
        check(self.num_nextn_predict_layers >= 0, "model.num_nextn_predict_layers", self.num_nextn_predict_layers,
              "must be >= 0")
        check(self.n_shared_experts >= 0, "model.n_shared_experts", self.n_shared_experts, "must be >= 0")
        check(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "model.first_k_dense_replace",
              self.first_k_dense_replace, f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        check(self.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        check(self.num_experts_per_tok <= self.n_routed_experts, "model.num_experts_per_tok",
              self.num_experts_per_tok, f"must be <= n_routed_experts={self.n_routed_experts}")
        check(self.n_routed_experts % self.n_group == 0, "model.n_routed_experts", self.n_routed_experts,
              f"must be divisible by n_group={self.n_group}")
        check(self.topk_group <= self.n_group, "model.topk_group", self.topk_group,
              f"must be <= n_group={self.n_group}")
        check_choice("model.scoring_func", self.scoring_func, ("sigmoid", "softmax"))
        check_choice("model.topk_method", self.topk_method, ("noaux_tc", "greedy", "group_limited_greedy"))
        check_choice("model.hidden_act", self.hidden_act, ("silu",))
        if self.topk_method != "greedy":
            per_group = self.n_routed_experts // self.n_group
            check(self.topk_group * per_group >= self.num_experts_per_tok, "model.topk_group",
                  self.topk_group, f"topk_group * experts per group ({per_group}) must be >= "
                  f"num_experts_per_tok={self.num_experts_per_tok}")
        if self.topk_method == "noaux_tc":
            check(self.n_routed_experts // self.n_group >= 2, "model.n_group", self.n_group,
                  "noaux_tc scores a group by its top-2 experts, so each group needs >= 2 experts")
        check(self.rms_norm_eps > 0, "model.rms_norm_eps", self.rms_norm_eps, "must be > 0")
        check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def num_expert_layers(self) -> int:
        """Layers with routed experts, the MTP modules' included: what expert placement and EPLB cover
        (rows 0.. are model layers first_k_dense_replace, ..., num_hidden_layers + MTP layers - 1)."""
        return self.num_moe_layers + self.num_nextn_predict_layers

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace
