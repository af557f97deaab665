"""adallm.patch(method="gptq", calibration=ids) on tiny random Qwen3 / Qwen3-MoE / Gemma3 models, and the
sequential hessians of adallm.calibration.

- the result is standard NVFP4: the patched model computes what transformers computes with the
  dequantized weights (integration_common's reference and FA-3 tolerance rule);
- gptq lowers the error on the calibration inputs below mse's (per fused group of the first layer, whose
  inputs do not depend on quantization, and for the whole model's logits);
- the hessians handed to layer i are those of its inputs with layers < i already quantized (recomputed
  here from the final fake-quantized model, in float64, with hooks of the test's own);
- bad input fails with a ValueError naming the problem.
"""
import copy

import pytest
import torch
from integration_common import assert_fa3_rule, reference_models, three_way, tiny_model
from torch import nn

import adallm
from adallm import nvfp4
from adallm.calibration import quantize_layers, self_generated_calibration
from adallm.linear import NVFP4Linear
from adallm.mlp import NVFP4Experts
from adallm_ops.reference import dequantize_nvfp4

FAMILIES = ("qwen3", "qwen3_moe", "gemma3")


def calibration_ids(model, n: int = 4, length: int = 48) -> torch.Tensor:
    return self_generated_calibration(model, n, length, bos_token_id=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_patch_is_standard_nvfp4(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    ids = calibration_ids(model)
    models = reference_models(family, model=model, method="gptq", calibration=ids)
    assert not any(isinstance(m, nn.Linear) for m in models[0].model.layers.modules())
    tokens = torch.randint(1, model.config.vocab_size, (2, 20))
    mask = torch.ones_like(tokens)
    assert_fa3_rule(*three_way(models, False, tokens, [20], mask), mask.bool(), f"{family} gptq")


def _dense_weights(patched) -> dict[str, torch.Tensor]:
    """{"self_attn.qkv_proj" / "mlp.experts.gate_up" / ...: float64 dequantized weight} of layer 0."""
    out = {}
    for name, m in patched.model.layers[0].named_modules():
        if isinstance(m, NVFP4Linear):
            out[name] = m.dequantize().double()
        elif isinstance(m, NVFP4Experts):
            for kind in ("gate_up", "down"):
                out[f"{name}.{kind}"] = dequantize_nvfp4(getattr(m, f"{kind}_weight"), getattr(m, f"{kind}_weight_scale"),
                                                         getattr(m, f"{kind}_weight_global_scale")).double()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_beats_mse_on_calibration_inputs(family):
    torch.manual_seed(1)
    model = tiny_model(family)
    ids = calibration_ids(model)
    layer = model.model.layers[0]
    # Layer 0's dense inputs (float64) of each linear group, and its dense weights.
    inputs, hooks = {}, []
    groups = {"self_attn.qkv_proj": (layer.self_attn.q_proj, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                              layer.self_attn.v_proj]),
              "self_attn.o_proj": (layer.self_attn.o_proj, [layer.self_attn.o_proj])}
    if hasattr(layer.mlp, "gate_proj"):
        groups["mlp.gate_up_proj"] = (layer.mlp.gate_proj, [layer.mlp.gate_proj, layer.mlp.up_proj])
        groups["mlp.down_proj"] = (layer.mlp.down_proj, [layer.mlp.down_proj])
    for key, (first, _) in groups.items():
        hooks.append(first.register_forward_pre_hook(
            lambda m, a, key=key: inputs.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        dense_logits = model(ids).logits.double()
    for h in hooks:
        h.remove()
    dense = {k: torch.cat([lin.weight.double() for lin in lins]) for k, (_, lins) in groups.items()}

    errors = {}
    for method in ("mse", "gptq"):
        patched = adallm.patch(copy.deepcopy(model), method=method, progress=False,
                               calibration=ids if method == "gptq" else None)
        q = _dense_weights(patched)
        errs = {k: float((torch.cat(inputs[k]) @ (dense[k].detach() - q[k]).T).square().sum()) for k in groups}
        with torch.no_grad():
            errs["logits"] = float((patched(ids).logits.double() - dense_logits).square().mean())
        errors[method] = errs
    for k in errors["mse"]:
        assert errors["gptq"][k] < 0.8 * errors["mse"][k], (family, k, errors)


def _fake_quantize_rtn(layer, hessians, seen):
    """A quantize_layer callback: records the hessians, then writes rtn-dequantized weights into the layer."""
    seen.append({k: v.clone() for k, v in hessians.items()})
    for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
        lin.weight.data = nvfp4.quantize(lin.weight.data, method="rtn").dequantize(lin.weight.dtype)


def test_hessians_see_earlier_layers_quantized():
    torch.manual_seed(2)
    model = tiny_model("gemma3", dtype=torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (3, 24))
    dense = copy.deepcopy(model).double()
    seen = []
    quantize_layers(model.model, ids, lambda layer, h: _fake_quantize_rtn(layer, h, seen))

    def hessians(m):
        """{(layer, key): float64 sum of x x^T} over the forward of m on ids."""
        out, hooks = {}, []
        for i, layer in enumerate(m.model.layers):
            for key in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
                mod = layer.get_submodule(key)
                hooks.append(mod.register_forward_pre_hook(
                    lambda _, a, k=(i, key): out.__setitem__(k, a[0].reshape(-1, a[0].shape[-1]).double().T
                                                             @ a[0].reshape(-1, a[0].shape[-1]).double())))
        with torch.no_grad():
            m(ids, use_cache=False)
        for h in hooks:
            h.remove()
        return out

    # Layer i's hessians are taken from its dense forward on the outputs of layers < i, quantized: the
    # dense model with layers < i replaced by the final (fake-quantized) ones reproduces them.
    quantized = copy.deepcopy(model).double()
    assert len(seen) == len(model.model.layers)
    for i in range(len(seen)):
        mixed = copy.deepcopy(dense)
        for j in range(i):
            mixed.model.layers[j].load_state_dict(quantized.model.layers[j].state_dict())
        want = hessians(mixed)
        for key in seen[i]:
            h64 = want[(i, key)]
            assert float((seen[i][key].double() - h64).norm() / h64.norm()) < 1e-5, (i, key)
            if i > 0:  # and they differ from the dense model's: the earlier layers were quantized
                assert float((hessians(dense)[(i, key)] - h64).norm() / h64.norm()) > 1e-3, (i, key)


class _Stop(Exception):
    pass


def test_moe_expert_hessians_per_expert():
    """The expert hessians are those of the tokens routed to each expert (recomputed from the router)."""
    torch.manual_seed(3)
    model = tiny_model("qwen3_moe", dtype=torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (2, 16))
    layer0 = model.model.layers[0]
    x0 = {}
    layer0.mlp.register_forward_pre_hook(lambda m, a: x0.update(x=a[0].reshape(-1, a[0].shape[-1])))
    seen = []

    def record(layer, hessians):
        seen.append(hessians)
        raise _Stop  # only layer 0 is needed

    with pytest.raises(_Stop):
        quantize_layers(model.model, ids, record)
    x = x0["x"].double()
    mlp = layer0.mlp.requires_grad_(False)
    logits = nn.functional.linear(x, mlp.gate.weight.double()).softmax(-1)
    chosen = logits.topk(model.config.num_experts_per_tok, dim=-1).indices
    ex = mlp.experts
    for e in range(model.config.num_experts):
        xe = x[(chosen == e).any(-1)]
        gate, up = (xe @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
        he = nn.functional.silu(gate) * up
        for key, want in (("gate_up_proj", xe.T @ xe), ("down_proj", he.T @ he)):
            got = seen[0][f"mlp.experts.{key}"][e].double()
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max().clamp(min=1))), (e, key)


def test_bad_input():
    model = tiny_model("qwen3")
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with pytest.raises(ValueError, match="needs calibration"):
        adallm.patch(copy.deepcopy(model), method="gptq", progress=False)
    with pytest.raises(ValueError, match="only by method='gptq'"):
        adallm.patch(copy.deepcopy(model), method="mse", calibration=ids, progress=False)
    with pytest.raises(ValueError, match=r"LongTensor of token ids \[n, L\]"):
        adallm.patch(copy.deepcopy(model), method="gptq", calibration=ids[0], progress=False)
    with pytest.raises(ValueError, match="in \\[0, 256\\)"):
        adallm.patch(copy.deepcopy(model), method="gptq", calibration=ids + 256, progress=False)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        adallm.patch(copy.deepcopy(model).float(), method="gptq", calibration=ids, progress=False)


def test_self_generated_calibration():
    model = tiny_model("qwen3")
    state = torch.get_rng_state()
    a = self_generated_calibration(model, 3, 10, bos_token_id=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert a.shape == (3, 10) and a.dtype == torch.long and bool((a[:, 0] == 1).all())
    assert torch.equal(a, self_generated_calibration(model, 3, 10, bos_token_id=1))  # seeded
    assert not torch.equal(a, self_generated_calibration(model, 3, 10, bos_token_id=1, seed=1))
