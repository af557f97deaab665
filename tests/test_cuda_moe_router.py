"""CUDA adallm::moe_router_topk (csrc/moe_router_topk.cuh) against the CPU reference: the same experts (ties: the
lower expert first) and logits / weights within a rounding (the kernel's fp32 sums run in another order)."""
import pytest
import torch

import adallm_ops  # noqa: F401  (registers the ops and loads the CUDA kernels)
from bad_input_child import expect_value_errors, run_as_child

pytestmark = pytest.mark.cuda
DEV = "cuda"


def check_against_reference(x, w, k, renormalize):
    logits, weights, ids = torch.ops.adallm.moe_router_topk(x.to(DEV), w.to(DEV), k, renormalize)
    ref_logits, ref_weights, ref_ids = torch.ops.adallm.moe_router_topk(x, w, k, renormalize)
    ulp = 2.0 ** -7 if x.dtype == torch.bfloat16 else 2.0 ** -10
    # A logit may round to the neighbour of the reference's; the selection follows each side's own logits.
    torch.testing.assert_close(logits.cpu().float(), ref_logits.float(), rtol=2 * ulp, atol=1e-3)
    same = (logits.cpu() == ref_logits).all(-1)  # rows whose logits agree exactly must pick the same experts
    assert torch.equal(ids.cpu()[same], ref_ids[same]) and ids.dtype == torch.int64
    assert same.any()
    torch.testing.assert_close(weights.cpu()[same].float(), ref_weights[same].float(), rtol=2 * ulp, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 300])  # <= 16: the kernel; more: the prefill path
@pytest.mark.parametrize("experts,hidden,k", [(128, 2048, 8), (60, 256, 4), (512, 64, 32), (8, 128, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_matches_reference(dtype, tokens, experts, hidden, k, renormalize):
    torch.manual_seed(tokens * 1000 + experts)
    x = torch.randn(tokens, hidden).to(dtype)
    w = (torch.randn(experts, hidden) * hidden ** -0.5).to(dtype)
    check_against_reference(x, w, k, renormalize)


def test_ties_pick_the_lower_expert():
    x = torch.randn(4, 256).to(torch.bfloat16)
    w = torch.randn(64, 256).to(torch.bfloat16)
    w[40] = w[3]
    w[63] = w[3]
    x[0] = w[3]  # token 0 prefers expert 3 and its two copies, which tie with it exactly
    _, _, ids = torch.ops.adallm.moe_router_topk(x.to(DEV), w.to(DEV), 4, True)
    assert ids[0, :3].tolist() == [3, 40, 63]
    check_against_reference(x, w, 4, True)


def test_repeated_and_graph_launches():
    # The last-CTA selection counts arrivals in a device counter that each launch resets: calls in a row and
    # replays of a captured graph must all select.
    x = torch.randn(2, 512, dtype=torch.bfloat16, device=DEV)
    w = torch.randn(128, 512, dtype=torch.bfloat16, device=DEV)
    first = torch.ops.adallm.moe_router_topk(x, w, 8, True)
    for _ in range(5):
        for a, b in zip(torch.ops.adallm.moe_router_topk(x, w, 8, True), first):
            assert torch.equal(a, b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.adallm.moe_router_topk(x, w, 8, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.adallm.moe_router_topk(x, w, 8, True)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = torch.ops.adallm.moe_router_topk(x, w, 8, True)
        for a, b in zip(out, ref):
            assert torch.equal(a, b)


def _bad_input_cases():
    x = torch.randn(2, 64, dtype=torch.bfloat16, device=DEV)
    w = torch.randn(8, 64, dtype=torch.bfloat16, device=DEV)
    router = torch.ops.adallm.moe_router_topk
    return [
        (lambda: router(x.float(), w, 2, True), "x must be bfloat16 or float16"),
        (lambda: router(x, w.half(), 2, True), "the router weight must be"),
        (lambda: router(x, w[:, :32], 2, True), "x must be [T, H] and the router weight [E, H]"),
        (lambda: router(x, w, 9, True), "top_k = 9 must be in [1, E = 8]"),
        (lambda: router(x, torch.randn(600, 64, dtype=torch.bfloat16, device=DEV), 2, True), "at most 512 experts"),
        (lambda: router(torch.randn(2, 60, dtype=torch.bfloat16, device=DEV), torch.randn(8, 60, dtype=torch.bfloat16,
                                                                                          device=DEV), 2, True),
         "H % 8 == 0"),
        (lambda: router(x, w.cpu(), 2, True), "must be on one device"),
    ]


def test_bad_inputs_raise_clear_errors():
    run_as_child(__file__)


if __name__ == "__main__":
    expect_value_errors(_bad_input_cases())
