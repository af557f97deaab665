"""A small module using both main ops compiles with fullgraph=True, keeps the ops in the graph and
matches eager."""
import torch
from torch import nn

import adallm_ops
from adallm import NVFP4Linear


class TinyDecodeBlock(nn.Module):
    def __init__(self, hidden=64, heads=4, kv_heads=2, head_dim=64, length=32):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = NVFP4Linear.from_dense([nn.Linear(hidden, heads * head_dim, bias=False)])
        self.o = NVFP4Linear.from_dense([nn.Linear(heads * head_dim, hidden, bias=False)])
        self.register_buffer("k_cache", torch.randn(1, kv_heads, length, head_dim).to(torch.float8_e4m3fn))
        self.register_buffer("v_cache", torch.randn(1, kv_heads, length, head_dim).to(torch.float8_e4m3fn))
        self.register_buffer("k_scale", torch.rand(1, kv_heads, length) + 0.5)
        self.register_buffer("v_scale", torch.rand(1, kv_heads, length) + 0.5)

    def forward(self, x, seqlens, starts):  # x: [1, hidden]
        q = self.q(x.bfloat16()).view(1, self.heads, self.head_dim)
        a = torch.ops.adallm.fp8_decode_attention(q, self.k_cache, self.v_cache, self.k_scale, self.v_scale,
                                                  seqlens, starts, self.head_dim ** -0.5, 0, 0.0)
        return self.o(a.reshape(1, -1))


def test_compile_fullgraph_keeps_adallm_ops():
    mod = TinyDecodeBlock()
    x = torch.randn(1, 64)
    seqlens, starts = torch.tensor([20], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend=backend)
    out = compiled(x, seqlens, starts)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "adallm.nvfp4_linear" in targets
    assert "adallm.fp8_decode_attention" in targets
    torch.testing.assert_close(out, mod(x, seqlens, starts), rtol=0, atol=0)


def test_compile_inductor_matches_eager():
    mod = TinyDecodeBlock()
    x = torch.randn(1, 64)
    seqlens, starts = torch.tensor([32], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    torch._dynamo.reset()
    out = torch.compile(mod, fullgraph=True)(x, seqlens, starts)
    torch.testing.assert_close(out, mod(x, seqlens, starts), rtol=1e-2, atol=1e-2)
