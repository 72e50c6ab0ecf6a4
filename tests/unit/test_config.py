"""Config schemas: presets compose, impossible values fail naming the field, config.json spellings."""

import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from moe_pd.config import ConfigError, ModelConfig
from moe_pd.config.hf import model_config_from_hf, resolve_model_config
from moe_pd.config.store import register_configs, to_config

register_configs()


def composed(*overrides):
    with initialize_config_module("moe_pd.conf", version_base=None):
        return to_config(compose("generate", overrides=list(overrides)))


@pytest.mark.parametrize("preset", ["tiny", "deepseek_v3", "deepseek_v2_lite"])
def test_presets_compose_and_validate(preset):
    cfg = composed(f"model={preset}")
    assert isinstance(cfg.model, ModelConfig)


def test_deepseek_v3_preset_has_published_shapes():
    m = composed("model=deepseek_v3").model
    assert (m.hidden_size, m.num_hidden_layers, m.n_routed_experts, m.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (m.n_group, m.topk_group, m.routed_scaling_factor, m.first_k_dense_replace) == (8, 4, 2.5, 3)
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim, m.vocab_size) == (1536, 512, 64, 129280)
    assert m.rope_scaling.factor == 40 and m.rope_scaling.original_max_position_embeddings == 4096


def test_tiny_preset_shape():
    m = composed().model
    assert m.first_k_dense_replace == 1 and m.num_hidden_layers >= 2
    assert 8 <= m.n_routed_experts <= 16 and m.n_group > 1 and m.n_shared_experts >= 1


def test_path_preset_requires_path():
    with pytest.raises(ConfigError, match="model.path"):
        composed("model=path")


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.n_routed_experts=10", "model.n_routed_experts"),  # not divisible by n_group=4
        ("model.num_experts_per_tok=17", "model.num_experts_per_tok"),
        ("model.topk_group=5", "model.topk_group"),
        ("model.scoring_func=relu", "model.scoring_func"),
        ("model.architecture=LlamaForCausalLM", "model.architecture"),
        ("sampling.top_p=0", "sampling.top_p"),
        ("sampling.max_new_tokens=0", "sampling.max_new_tokens"),
        ("kvcache.block_size=0", "kvcache.block_size"),
        ("runtime.dtype=int8", "runtime.dtype"),
    ],
)
def test_impossible_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        composed(override)


def test_type_errors_fail_at_compose_time():
    with pytest.raises(Exception, match="hidden_size"):
        composed("model.hidden_size=wide")


DEEPSEEK_RELEASED = {  # DeepSeek-V3's config.json spelling (abridged to tiny sizes)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_nextn_predict_layers": 1, "first_k_dense_replace": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 16,
    "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "moe_layer_freq": 1,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
}


def test_released_config_json_spelling():
    m = model_config_from_hf(DEEPSEEK_RELEASED)
    assert m.rope_scaling.factor == 40 and m.rope_scaling.mscale_all_dim == 1.0
    assert m.topk_method == "noaux_tc" and m.scoring_func == "sigmoid" and m.rope_interleave


def test_transformers_config_json_spelling():
    hf = {k: v for k, v in DEEPSEEK_RELEASED.items() if k not in ("rope_scaling", "rope_theta", "scoring_func",
                                                                    "topk_method")}
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                             "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert model_config_from_hf(hf) == model_config_from_hf(DEEPSEEK_RELEASED)


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**DEEPSEEK_RELEASED, "architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(ConfigError, match="MixtralForCausalLM.*DeepseekV3ForCausalLM, DeepseekV2ForCausalLM"):
        resolve_model_config(ModelConfig(path=str(tmp_path)))


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_config(ModelConfig(path=str(tmp_path)))


def test_unsupported_rope_type():
    hf = {**DEEPSEEK_RELEASED, "rope_scaling": {"type": "longrope", "factor": 2}}
    with pytest.raises(ConfigError, match="longrope"):
        model_config_from_hf(hf)


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import moe_pd.config.engine as eng
    import moe_pd.config.generate as gen
    import moe_pd.config.kvcache as kv
    import moe_pd.config.model as model
    import moe_pd.config.parallel as par
    import moe_pd.config.runtime as rt
    import moe_pd.config.sampling as smp
    import moe_pd.config.serve as srv

    for module in (eng, gen, kv, model, par, rt, smp, srv):
        tree = ast.parse(inspect.getsource(module))
        for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
            body = cls.body
            for i, node in enumerate(body):
                if isinstance(node, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                        f"{module.__name__}.{cls.name}.{node.target.id} has no docstring"


def test_yaml_lists_schema_then_deltas():
    from importlib.resources import files

    for file in files("moe_pd.conf").joinpath("model").iterdir():
        if file.name.endswith(".yaml"):
            data = OmegaConf.load(str(file))
            assert data.defaults == ["model_schema"], file.name


@pytest.mark.parametrize("name, overrides", [
    ("generate", []),
    ("serve", []),
    ("prefill", []),
    ("decode", ["advertise_host=10.0.0.2", "kv_host=0.0.0.0"]),
    ("colocated", ["parallel.num_redundant_experts=2"]),
    ("router", ["prefill=[tcp://h:1]", "decode=[tcp://h:2]"]),
    ("router", ["colocated=[tcp://h:1]"]),
])
def test_every_command_config_composes(name, overrides):
    with initialize_config_module("moe_pd.conf", version_base=None):
        cfg = to_config(compose(name, overrides=overrides))
    if name in ("prefill", "decode", "colocated"):
        assert cfg.role == name


@pytest.mark.parametrize("overrides, message", [
    ([], "give either colocated instances or prefill and decode"),
    (["prefill=[tcp://h:1]"], "PD mode needs at least one prefill and one decode"),
    (["colocated=[tcp://h:1]", "decode=[tcp://h:2]"], "give either colocated"),
])
def test_router_needs_a_consistent_set_of_instances(overrides, message):
    with initialize_config_module("moe_pd.conf", version_base=None), pytest.raises(ConfigError, match=message):
        to_config(compose("router", overrides=overrides))


def test_service_role_is_checked():
    with initialize_config_module("moe_pd.conf", version_base=None), pytest.raises(ConfigError, match="role"):
        to_config(compose("prefill", overrides=["role=both"]))
