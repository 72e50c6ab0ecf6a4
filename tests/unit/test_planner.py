"""The planner's cost terms on hand-worked numbers, its operating-point rules, and its command line."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from moe_pd.config.errors import ConfigError
from moe_pd.config.model import ModelConfig
from moe_pd.config.planner import DecodeConfig, HardwareConfig, PrefillConfig
from moe_pd.planner.calibrate import load
from moe_pd.planner.costs import LayerCosts, destinations, expected_distinct, prefill_context
from moe_pd.planner.phases import decode_step, prefill_step
from moe_pd.planner.plan import KV_CAPACITY, MAX_BATCH, TPOT_SLO, plan, plan_decode, plan_prefill, resolve_model
from moe_pd.planner.roofline import COMPUTE, HBM, Device, StepTime

V3 = LayerCosts(ModelConfig(), weight_bytes=1.0, mtp_layers=1)
MOONLIGHT = Path(__file__).parents[1] / "golden" / "moonlight_16b_a3b"
# A device with round numbers: 1 TFLOP/s in every format, 1 TB/s memory, 100 GB/s links, nothing lost.
ROUND = HardwareConfig(name="round", flops_bf16=1.0, flops_fp8=1.0, hbm_bw=1000.0, hbm_gb=100.0, nvlink_bw=100.0,
                       rdma_bw=100.0, gpus_per_node=8, sms=100, reserved_gb=0.0, eff_gemm=1.0, eff_attn=1.0,
                       eff_hbm=1.0, eff_net=1.0)


def test_v3_parameter_counts():
    """MLA: W_DQ 7168x1536 + W_UQ 1536x(128x192) + W_DKV/W_KR 7168x576 + W_UK/W_UV 512x(128x256) + W_O
    (128x128)x7168; an expert 3 x 7168 x 2048. Summed over the 61 layers they give DeepSeek's 671B total and
    ~37B activated per token."""
    assert V3.attn_params == 11_010_048 + 37_748_736 + 4_128_768 + 16_777_216 + 117_440_512 == 187_105_280
    assert V3.expert_params == 44_040_192 and V3.dense_mlp_params == 396_361_728
    layers = 61 * V3.attn_params + 3 * V3.dense_mlp_params + 2 * V3.vocab_params
    total = layers + 58 * (257 * V3.expert_params + V3.gate_params)
    activated = layers + 58 * (9 * V3.expert_params + V3.gate_params)
    assert total / 1e9 == pytest.approx(671, rel=0.01)
    assert activated / 1e9 == pytest.approx(37, rel=0.03)


def test_attention_flops_and_kv_bytes():
    # Expanded: QK over 128 + 64, PV over 128, per head; absorbed: QK over 512 + 64, PV over 512.
    assert V3.prefill_attn_flops(1000) == 2 * 128 * 320 * 1000 == 81_920_000
    assert V3.decode_attn_flops(1000) == 2 * 128 * 1088 * 1000 == 278_528_000
    # 61 layers + 1 MTP layer of (512 + 64) BF16 values.
    assert V3.kv_bytes_per_token(2) == 62 * 576 * 2 == 71_424
    assert V3.dispatch_bytes(fp8=True) == 7168 + 4 * 56 and V3.combine_bytes() == 14336


def test_causal_context_and_cache_hits():
    assert prefill_context(4, 0) == (1 + 2 + 3 + 4) / 4
    assert prefill_context(4, 2) == (3 + 4) / 2  # only the two new tokens are computed


def test_destinations():
    # 4 of 8 groups, 2 groups per node: 4 * (1 - C(6,4)/C(8,4)) nodes hit.
    assert expected_distinct(4, 2, 8, 4) == pytest.approx(4 * (1 - 15 / 70))
    other_nodes, other_ranks = destinations(ModelConfig(), 32, 8)
    assert other_nodes == pytest.approx(4 * (1 - 15 / 70) * 3 / 4)
    miss = math.prod((248 - j) / (256 - j) for j in range(8))
    assert other_ranks == pytest.approx(32 * (1 - miss) * 31 / 32)
    assert destinations(ModelConfig(), 8, 8)[0] == 0  # one node: nothing crosses RDMA


def test_roofline_picks_the_slower_side():
    dev, step = Device(replace(ROUND, flops_fp8=10.0), "fp8"), StepTime()
    # 1000 rows through 1M FP8 weights: 2 GFLOP at 10 TFLOP/s = 200 us > 1 MB at 1 TB/s = 1 us.
    assert dev.gemm(step, rows=1000, params=1e6) == pytest.approx(2e9 / 10e12)
    # One row through 1G weights: 1 GB at 1 TB/s = 1 ms > 2 GFLOP at 10 TFLOP/s = 200 us.
    assert dev.gemm(step, rows=1, params=1e9) == pytest.approx(1e9 / 1e12)
    assert step.parts[COMPUTE] == pytest.approx(2e-4) and step.parts[HBM] == pytest.approx(1e-3)


def test_overlap_adds_only_uncovered_communication():
    cfg = PrefillConfig(ep=16, comm_sms=0, balancedness=1.0)
    args = (V3, ROUND, cfg, "fp8", 1024, 512, 2, 1024, 2)
    hidden, _ = prefill_step(*args)
    plain, _ = prefill_step(V3, ROUND, replace(cfg, overlap=False), *args[3:])
    assert hidden.comm == pytest.approx(plain.comm) and plain.exposed_comm == pytest.approx(plain.comm)
    assert hidden.total == pytest.approx(plain.total - plain.comm + hidden.exposed_comm)
    assert hidden.exposed_comm < hidden.comm


def test_prefill_step_hand_worked():
    """1024 tokens on the round device, one node (EP8, 256/8 = 32 experts each), perfect balance, no overlap:
    every GEMM is FLOP-bound, so the step is 2 * tokens * (active params) / 1e12 plus attention."""
    cfg = PrefillConfig(ep=8, num_redundant_experts=0, balancedness=1.0, overlap=False)
    costs = LayerCosts(ModelConfig(), 1.0, 0)
    step, kv = prefill_step(costs, ROUND, cfg, "fp8", 1024, 512, 1, 1024, 2)
    per_token = (61 * costs.attn_params + 3 * costs.dense_mlp_params + 58 * (9 * costs.expert_params
                 + costs.gate_params) + 61 * costs.prefill_attn_flops(512) / 2 + costs.vocab_params / 1024)
    assert step.busy == pytest.approx(2 * 1024 * per_token / 1e12, rel=1e-3)
    assert kv == pytest.approx(1024 * 61 * 576 * 2 / 100e9)


def test_decode_attention_reads_the_latent_cache():
    """Batch 64 at 4096 tokens: 64 * 4096 * 576 * 2 bytes = 302 MB a layer at 1 TB/s = 302 us; its FLOPs at
    1 TFLOP/s take longer, so with a 1 PFLOP/s device the layer's attention is HBM-bound at exactly that."""
    fast = replace(ROUND, flops_bf16=1000.0, flops_fp8=1000.0)
    one_layer = LayerCosts(ModelConfig(num_hidden_layers=1, first_k_dense_replace=1), 1.0, 0)
    step = decode_step(one_layer, fast, DecodeConfig(ep=8, num_redundant_experts=0), "fp8", 64, 4096, 0)
    assert step.parts[HBM] >= 64 * 4096 * 576 * 2 / 1e12


def test_mtp_multiplies_output_at_the_draft_layers_cost():
    cfg = load(["workload.kv_len=4000"])
    costs, precision = LayerCosts(ModelConfig(), 1.0, 1), "fp8"
    plain = plan_decode(replace(cfg, decode=replace(cfg.decode, mtp_draft_tokens=0)), costs, precision, batch=64)
    mtp = plan_decode(cfg, costs, precision, batch=64)
    assert mtp.step.total > plain.step.total  # verify 2 tokens a sequence and run the draft layer
    assert mtp.output_tok_s_per_device == pytest.approx(64 * 1.85 / mtp.step.total)
    assert plain.output_tok_s_per_device == pytest.approx(64 / plain.step.total)


def test_cache_hits_remove_compute_not_input():
    cfg = load(["workload.input_len=1024", "workload.cache_hit_rate=0"])
    costs, precision = LayerCosts(ModelConfig(), 1.0, 1), "fp8"
    cold = plan_prefill(cfg, costs, precision)
    warm = plan_prefill(replace(cfg, workload=replace(cfg.workload, cache_hit_rate=0.5)), costs, precision)
    # Half the input is cached: about twice the input per second (a little less: longer contexts).
    assert 1.8 < warm.input_tok_s_per_device / cold.input_tok_s_per_device < 2.0


def test_decode_batch_limits():
    cfg = load([])
    costs, precision = LayerCosts(ModelConfig(), 1.0, 1), "fp8"
    free = (80 - 10) * 1e9 - costs.weight_bytes_per_device(2)  # H800 less the reserve and EP144's weights
    long = replace(cfg, workload=replace(cfg.workload, input_len=32768))
    d = plan_decode(long, costs, precision)
    assert d.batch_limit == KV_CAPACITY and d.bound == KV_CAPACITY
    assert d.batch == int(free // ((32768 + cfg.workload.output_len / 2) * costs.kv_bytes_per_token(2)))
    short = replace(cfg, workload=replace(cfg.workload, input_len=2000))
    assert plan_decode(short, costs, precision).batch_limit == MAX_BATCH  # 128 fit
    tight = plan_decode(replace(cfg, workload=replace(cfg.workload, tpot_slo_ms=40.0)), costs, precision)
    assert tight.batch_limit == TPOT_SLO and tight.tpot_ms <= 40.0
    assert plan_decode(replace(cfg, workload=replace(cfg.workload, tpot_slo_ms=40.0)), costs, precision,
                       batch=tight.batch + 1).tpot_ms > 40.0


def test_day6_reproduced_and_presets_hold_the_fit():
    from moe_pd.planner.calibrate import DAY6_CASES, fit, table

    for case, predicted, err in table(DAY6_CASES):
        assert abs(err) < 0.15, (case.name, predicted)
    gemm, net = fit()
    hw = load(["hardware=h800"]).hardware
    assert hw.eff_gemm == pytest.approx(gemm, rel=0.01) and hw.eff_net == pytest.approx(net, rel=0.01)


def test_another_v3_architecture_config_json():
    """Moonlight-16B-A3B's config.json (DeepseekV3ForCausalLM: 64 experts in one group, no q LoRA, BF16, no
    MTP) goes through the loader's reader and plans."""
    cfg = load(["model=path", f"model.path={MOONLIGHT}", "prefill.ep=8", "decode.ep=16",
                "prefill.num_redundant_experts=0", "decode.num_redundant_experts=0"])
    model, precision, mtp = resolve_model(cfg)
    assert (model.n_routed_experts, model.n_group, model.q_lora_rank, precision, mtp) == (64, 1, None, "bf16", 0)
    p = plan(cfg)
    assert p.prefill_input_tok_s_per_node > 0 and p.decode.batch > 0
    costs = LayerCosts(model, 2.0, 0)
    assert costs.attn_params == 2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048
    with pytest.raises(ConfigError, match="decode.ep=80"):
        plan(replace(cfg, decode=replace(cfg.decode, ep=80)))


def test_command_line_json():
    proc = subprocess.run([sys.executable, "-m", "moe_pd.planner", "output=json", "workload.request_rate=100"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("prefill_input_tok_s_per_node", "decode_output_tok_s_per_node", "prefill_nodes", "decode_nodes",
                "ttft_s", "tpot_ms", "prefill_bound", "decode_bound"):
        assert key in out
    assert out["prefill_nodes"] % 4 == 0 and out["decode_nodes"] % 18 == 0  # whole units
    assert out["prefill_nodes"] * out["prefill_input_tok_s_per_node"] >= 100 * 4383
    bad = subprocess.run([sys.executable, "-m", "moe_pd.planner", "workload.cache_hit_rate=1.5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "workload.cache_hit_rate=1.5" in bad.stderr


def test_docs_validation_table_is_current():
    """docs/planner.md shows the calibration and validation table as the presets give it today."""
    from moe_pd.planner.calibrate import table

    text = (Path(__file__).parents[2] / "docs" / "planner.md").read_text()
    for case, predicted, err in table():
        assert f"| {case.name} | {case.published:,.0f} | {predicted:,.0f} | {100 * err:+.1f}% |" in text


@pytest.mark.parametrize("preset", ["h800", "h100", "h200", "b200"])
def test_hardware_presets_compose_and_plan(preset):
    cfg = load([f"hardware={preset}"])
    assert cfg.hardware.name == preset and cfg.hardware.eff_gemm == load([]).hardware.eff_gemm  # one Hopper fit
    assert plan(cfg).decode_output_tok_s_per_node > 0


def test_cpu_preset_and_fp8_block_reader():
    from moe_pd.config.hf import fp8_block_size

    cfg = load(["hardware=cpu", "model=tiny", "weights=fp32", "decode.kv_bytes=4", "decode.mtp_draft_tokens=0",
                "prefill.ep=2", "decode.ep=4", "prefill.num_redundant_experts=0", "decode.num_redundant_experts=0"])
    assert cfg.hardware.shared_cores == 2 and plan(cfg).precision == "fp32"
    v3_quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    assert fp8_block_size({"quantization_config": v3_quant}) == (128, 128)
    assert fp8_block_size({"torch_dtype": "bfloat16"}) is None
