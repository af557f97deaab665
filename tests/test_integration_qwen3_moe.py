"""adallm.patch on a tiny random Qwen3-MoE (8 experts, top-2, layer 1 dense via mlp_only_layers)."""
import torch
from integration_common import (check_batch_matches_alone, check_compile, check_continuation, check_greedy,
                                check_logits, tiny_model)

import adallm
from adallm.integrations.qwen3_moe import Router
from adallm.mlp import NVFP4Experts, NVFP4MLP


def test_logits_match_dequantized_reference():
    check_logits("qwen3_moe")


def test_greedy_64_tokens_left_padded_batch():
    check_greedy("qwen3_moe")


def test_batch_rows_match_rows_alone():
    check_batch_matches_alone("qwen3_moe")


def test_multi_turn_continuation():
    check_continuation("qwen3_moe")


def test_compile_fullgraph():
    check_compile("qwen3_moe")


def test_experts_swapped_router_fused():
    model = tiny_model("qwen3_moe")
    router = model.model.layers[0].mlp.gate
    adallm.patch(model, progress=False)
    sparse, dense = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert sparse.gate is router and isinstance(router, Router) and router.weight.dtype == torch.bfloat16
    assert isinstance(sparse.experts, NVFP4Experts) and isinstance(dense, NVFP4MLP)
    ex = sparse.experts
    assert ex.gate_up_weight.shape == (8, 128, 64) and ex.gate_up_weight_scale.shape == (8, 128, 8)
    assert ex.down_weight.shape == (8, 128, 32) and ex.down_weight_global_scale.shape == (8,)


def test_experts_match_float64_definition():
    """NVFP4Experts.forward vs sum_j w_j * down_e(act(gate_e(x)) * up_e(x)) in float64 on the dequantized weights."""
    from adallm_ops.reference import dequantize_nvfp4
    torch.manual_seed(0)
    e, h, i, t, k = 8, 128, 64, 5, 2
    ex = NVFP4Experts.from_dense(torch.randn(e, 2 * i, h) * 0.05, torch.randn(e, h, i) * 0.05, torch.nn.functional.silu)
    x = torch.randn(t, h).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k).softmax(-1).to(torch.bfloat16)
    gu = dequantize_nvfp4(ex.gate_up_weight, ex.gate_up_weight_scale, ex.gate_up_weight_global_scale).double()
    dn = dequantize_nvfp4(ex.down_weight, ex.down_weight_scale, ex.down_weight_global_scale).double()
    ref = torch.zeros(t, h, dtype=torch.float64)
    for r in range(t):
        for j in range(k):
            g, u = (gu[idx[r, j]] @ x[r].double()).chunk(2)
            ref[r] += w[r, j].double() * (dn[idx[r, j]] @ (torch.nn.functional.silu(g) * u))
    out = ex(x, idx, w).double()
    # bf16 intermediates (as transformers' experts): a few bf16 roundings.
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_router_matches_transformers():
    """Router (adallm::moe_router_topk) against transformers' Qwen3MoeTopKRouter on the same weight: same experts,
    weights within a bf16 rounding, same logits; at decode (T = 3) and prefill (T = 40) sizes."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    model = tiny_model("qwen3_moe")
    hf_router = model.model.layers[0].mlp.gate
    ours = Qwen3MoeTopKRouter(model.config).to(torch.bfloat16)
    ours.load_state_dict(hf_router.state_dict())
    ours.__class__ = Router
    torch.manual_seed(0)
    for t in (3, 40):
        x = torch.randn(t, model.config.hidden_size).to(torch.bfloat16)
        (l_hf, w_hf, i_hf), (l, w, i) = hf_router(x), ours(x)
        assert torch.equal(i, i_hf) and i.dtype == torch.int64
        torch.testing.assert_close(l, l_hf, rtol=2 ** -7, atol=1e-3)
        torch.testing.assert_close(w, w_hf, rtol=2 ** -7, atol=1e-4)
