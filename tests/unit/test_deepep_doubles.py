"""The DeepEP conformance doubles keep DeepEP's real Python signatures.

The signatures below are copied from DeepEP's deep_ep/buffers/legacy.py (V1 `Buffer`) and
deep_ep/buffers/elastic.py (V2 `ElasticBuffer`, `EPHandle`) at commit dd758ca (package 2.1.0): parameter
names, order and defaults. A double that drifts from them, and so an adapter written against the drift,
fails here. When DeepEP changes its API, update this table from its source, then the doubles, then the
adapters.
"""

import inspect

import pytest

from helpers import deepep_double, deepep_v2_double

_ = None  # no default
REAL = {
    "Buffer.__init__": [("group", _), ("num_nvl_bytes", 0), ("num_rdma_bytes", 0), ("low_latency_mode", False),
                        ("num_qps_per_rank", 24), ("allow_nvlink_for_low_latency_mode", True),
                        ("allow_mnnvl", False), ("explicitly_destroy", False), ("enable_shrink", False),
                        ("comm", None)],
    "Buffer.get_low_latency_rdma_size_hint": [("num_max_dispatch_tokens_per_rank", _), ("hidden", _),
                                              ("num_ranks", _), ("num_experts", _)],
    "Buffer.get_dispatch_config": [("num_ranks", _)],
    "Buffer.get_combine_config": [("num_ranks", _)],
    "Buffer.get_dispatch_layout": [("topk_idx", _), ("num_experts", _), ("previous_event", None),
                                   ("async_finish", False), ("allocate_on_comm_stream", False)],
    "Buffer.dispatch": [("x", _), ("handle", None), ("num_tokens_per_rank", None), ("num_tokens_per_rdma_rank", None),
                        ("is_token_in_rank", None), ("num_tokens_per_expert", None), ("topk_idx", None),
                        ("topk_weights", None), ("expert_alignment", 1), ("num_worst_tokens", 0), ("config", None),
                        ("previous_event", None), ("async_finish", False), ("allocate_on_comm_stream", False)],
    "Buffer.combine": [("x", _), ("handle", _), ("topk_weights", None), ("bias", None), ("config", None),
                       ("previous_event", None), ("async_finish", False), ("allocate_on_comm_stream", False)],
    "Buffer.low_latency_dispatch": [("x", _), ("topk_idx", _), ("num_max_dispatch_tokens_per_rank", _),
                                    ("num_experts", _), ("cumulative_local_expert_recv_stats", None),
                                    ("dispatch_wait_recv_cost_stats", None), ("use_fp8", True), ("round_scale", False),
                                    ("use_ue8m0", False), ("async_finish", False), ("return_recv_hook", False)],
    "Buffer.low_latency_combine": [("x", _), ("topk_idx", _), ("topk_weights", _), ("handle", _),
                                   ("use_logfmt", False), ("zero_copy", False), ("async_finish", False),
                                   ("return_recv_hook", False), ("out", None), ("combine_wait_recv_cost_stats", None)],
    "EPHandle.__init__": [(n, _) for n in (
        "do_expand", "num_experts", "expert_alignment", "num_max_tokens_per_rank", "num_sms", "topk_idx",
        "num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list",
        "psum_num_recv_tokens_per_scaleup_rank", "psum_num_recv_tokens_per_expert",
        "num_unaligned_recv_tokens_per_expert", "recv_src_metadata", "dst_buffer_slot_idx",
        "token_metadata_at_forward", "channel_linked_list")],
    "ElasticBuffer.__init__": [("group", _), ("num_bytes", None), ("num_cpu_bytes", 0), ("num_max_tokens_per_rank", 0),
                               ("hidden", 0), ("num_topk", 0), ("use_fp8_dispatch", False), ("deterministic", False),
                               ("allow_hybrid_mode", True), ("allow_multiple_reduction", True),
                               ("prefer_overlap_with_compute", True), ("sl_idx", 3), ("num_allocated_qps", 0),
                               ("num_cpu_timeout_secs", 300), ("num_gpu_timeout_secs", 100),
                               ("explicitly_destroy", False)],
    "ElasticBuffer.get_buffer_size_hint": [("group", _), ("num_max_tokens_per_rank", _), ("hidden", _),
                                           ("num_topk", 0), ("use_fp8_dispatch", False), ("allow_hybrid_mode", True),
                                           ("allow_multiple_reduction", True)],
    "ElasticBuffer.get_theoretical_num_sms": [("num_experts", _), ("num_topk", _), ("num_scaleout_topk", 0),
                                              ("rdma_gbs", 0), ("nvlink_gbs", 0), ("sm_read_gbs", 200),
                                              ("sm_write_gbs", 50)],
    "ElasticBuffer.get_theoretical_num_qps": [("num_sms", _)],
    "ElasticBuffer.dispatch": [("x", _), ("topk_idx", None), ("topk_weights", None),
                               ("cumulative_local_expert_recv_stats", None), ("num_experts", None),
                               ("num_max_tokens_per_rank", None), ("expert_alignment", None), ("num_sms", 0),
                               ("num_qps", 0), ("previous_event", None), ("previous_event_before_epilogue", None),
                               ("async_with_compute_stream", False), ("allocate_on_comm_stream", False),
                               ("handle", None), ("do_handle_copy", True), ("do_cpu_sync", None), ("do_expand", False),
                               ("do_zero_padding", False), ("use_tma_aligned_col_major_sf", False)],
    "ElasticBuffer.combine": [("x", _), ("handle", _), ("topk_weights", None), ("bias", None), ("num_sms", 0),
                              ("num_qps", 0), ("previous_event", None), ("previous_event_before_epilogue", None),
                              ("async_with_compute_stream", False), ("allocate_on_comm_stream", False)],
}
CLASSES = {"Buffer": deepep_double.Buffer, "ElasticBuffer": deepep_v2_double.ElasticBuffer,
           "EPHandle": deepep_v2_double.EPHandle}


@pytest.mark.parametrize("name", sorted(REAL))
def test_double_signature_is_deepeps(name):
    cls, method = name.split(".")
    params = [p for p in inspect.signature(getattr(CLASSES[cls], method)).parameters.values() if p.name != "self"]
    got = [(p.name, _ if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == REAL[name]


def test_low_latency_size_hint_follows_deepeps_layout():
    # LowLatencyLayout(128 tokens, hidden 7168, 16 ranks, 256 experts) of csrc/legacy/config.hpp, by hand:
    # dispatch message 16 + 7168 * 2 bytes, combine message 56 * 4 + 7168 * 2; two send, two receive and two
    # signalling buffers; rounded up to 128 bytes past the total.
    dispatch_msg, combine_msg = 16 + 14336, 224 + 14336
    send = max(128 * dispatch_msg, 256 * 128 * combine_msg)
    recv = max(256 * 128 * dispatch_msg, 256 * 128 * combine_msg)
    total = 2 * (send + recv + 1024)
    assert deepep_double.Buffer.get_low_latency_rdma_size_hint(128, 7168, 16, 256) == (total + 128) // 128 * 128
