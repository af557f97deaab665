"""torch.library.opcheck for every adallm op (schema, fake impl, autograd registration, dispatch)."""
import pytest
import torch

import adallm_ops
from adallm import nvfp4
from adallm_ops.ops import OP_NAMES
from adallm_ops.reference import fp8_quantize_rows

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def samples(device):
    q = nvfp4.quantize(torch.randn(24, 64, device=device))
    w = (q.weight, q.weight_scale, q.weight_global_scale)
    x = torch.randn(3, 64, dtype=torch.bfloat16, device=device)
    norm_w = torch.rand(64, dtype=torch.bfloat16, device=device) + 0.5
    e = [nvfp4.quantize(torch.randn(16, 64, device=device)) for _ in range(3)]
    ew = [torch.stack([getattr(qq, a) for qq in e]) for a in ("weight", "weight_scale", "weight_global_scale")]
    ids = torch.tensor([[0, 2], [1, 0], [2, 2]], device=device)
    b, hkv, length, d = 2, 2, 16, 64
    kc = torch.randn(b, hkv, length, d, device=device).to(torch.float8_e4m3fn)
    ks = torch.rand(b, hkv, length, device=device) + 0.5
    kv_new = torch.randn(b, hkv, 3, d, dtype=torch.bfloat16, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return {
        "nvfp4_linear": [(x, *w, None), (x, *w, torch.randn(24, dtype=torch.bfloat16, device=device)),
                         (x[:1], *w, None, torch.randn(1, 24, dtype=torch.bfloat16, device=device), norm_w, 1e-6),
                         (x, *w, None, None, norm_w, 1e-5)],
        "fp8_linear": [(x, *fp8_quantize_rows(torch.randn(24, 64, device=device)))],
        "nvfp4_linear_glu": [(x, *w, "silu"), (x[:1], *w, "gelu_tanh"), (x[:1], *w, "silu", norm_w, 1e-6)],
        "nvfp4_quantize": [(torch.randn(8, 32, device=device), torch.tensor(0.01, device=device))],
        "nvfp4_moe_linear": [(x, *ew, ids), (torch.randn(3, 2, 64, dtype=torch.bfloat16, device=device), *ew, ids)],
        "moe_router_topk": [(x, torch.randn(6, 64, dtype=torch.bfloat16, device=device), 2, True),
                            (torch.randn(20, 64, dtype=torch.bfloat16, device=device),
                             torch.randn(6, 64, dtype=torch.bfloat16, device=device), 3, False)],
        "fp8_kv_write": [(kv_new, kv_new.clone(), kc.clone(), kc.clone(), ks.clone(), ks.clone(),
                          torch.tensor([17, 18, 19], device=device))],
        "qk_norm_rope_kv_write": [
            (torch.randn(b, (4 + 2 * hkv) * d, dtype=torch.bfloat16, device=device),
             *torch.randn(2, d, dtype=torch.bfloat16, device=device), *torch.randn(2, rows, d, device=device).to(
                 torch.bfloat16), kc.clone(), kc.clone(), ks.clone(), ks.clone(), torch.tensor([21], device=device),
             1e-6, offset) for rows, offset in ((b, 0.0), (1, 1.0))],
        "fp8_decode_attention": [
            (torch.randn(b, 8, d, dtype=torch.bfloat16, device=device), kc, kc.clone(), ks, ks.clone(),
             torch.tensor([5, 16], **i32), torch.tensor([0, 3], **i32), 0.125, 0, 0.0),
            (torch.randn(b, 4, d, dtype=torch.bfloat16, device=device), kc, kc.clone(), ks, ks.clone(),
             torch.tensor([40, 16], **i32), torch.tensor([0, 3], **i32), 0.125, 16, 30.0),
        ],
    }


OPS = list(OP_NAMES)  # every op of the library: one without samples fails
# opcheck's test_schema compares inputs before/after with torch.allclose, which has no float8 kernel, so
# it cannot run on ops taking float8 tensors; test_declared_mutations below checks the same by bytes.
TAKES_FP8 = {"nvfp4_linear", "nvfp4_linear_glu", "fp8_linear", "nvfp4_moe_linear", "fp8_kv_write", "qk_norm_rope_kv_write",
             "fp8_decode_attention"}
ALL_BUT_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, device):
    utils = ALL_BUT_SCHEMA if op in TAKES_FP8 else ALL_BUT_SCHEMA + ("test_schema",)
    for args in samples(device)[op]:
        torch.library.opcheck(getattr(torch.ops.adallm, op).default, args, test_utils=utils)


def as_bytes(t):
    return t.view(torch.uint8).clone() if t.dtype == torch.float8_e4m3fn else t.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_declared_mutations(op, device):
    """Exactly the arguments the schema marks mutable (Tensor(a!)) change; outputs alias no input."""
    schema = getattr(torch.ops.adallm, op).default._schema
    for args in samples(device)[op]:
        before = [as_bytes(a) if isinstance(a, torch.Tensor) else None for a in args]
        out = getattr(torch.ops.adallm, op)(*args)
        for arg, a, b in zip(schema.arguments, args, before):
            if b is None:
                continue
            mutable = arg.alias_info is not None and arg.alias_info.is_write
            assert torch.equal(as_bytes(a), b) != mutable, f"{op}: {arg.name} mutable={mutable}"
        outs = out if isinstance(out, tuple) else (out,) if out is not None else ()
        for o in outs:
            assert all(o.data_ptr() != a.data_ptr() for a in args if isinstance(a, torch.Tensor))
