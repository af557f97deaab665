"""adallm.patch on a tiny random Qwen3: equivalence with the dequantized transformers model (see
integration_common.py for the reference and the tolerance rules), generate, compile, module tree, lm_head kinds."""
import copy

import pytest
import torch
from integration_common import (check_batch_matches_alone, check_compile, check_continuation, check_greedy,
                                check_logits, generate, reference_models, teacher_force, tiny_model)

import adallm
from adallm.linear import FP8Linear, NVFP4Linear


def test_logits_match_dequantized_reference():
    check_logits("qwen3")


def test_greedy_64_tokens_left_padded_batch():
    check_greedy("qwen3")


def test_batch_rows_match_rows_alone():
    check_batch_matches_alone("qwen3")


def test_multi_turn_continuation():
    check_continuation("qwen3")


def test_compile_fullgraph():
    check_compile("qwen3")


def test_module_tree_and_names():
    model = tiny_model("qwen3")
    adallm.patch(model, progress=False)
    names = {n for n, _ in model.named_buffers()}
    for suffix in ("self_attn.qkv_proj.weight", "self_attn.qkv_proj.weight_scale",
                   "self_attn.qkv_proj.weight_global_scale", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                   "mlp.down_proj.weight_scale"):
        assert f"model.layers.1.{suffix}" in names
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.parts == ("q_proj", "k_proj", "v_proj") and attn.qkv_proj.part_sizes == (256, 128, 128)
    assert model.model.layers[0].mlp.gate_up_proj.parts == ("gate_proj", "up_proj")
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert isinstance(model.lm_head, torch.nn.Linear)
    with pytest.raises(ValueError, match="already patched"):
        adallm.patch(model, progress=False)


@pytest.mark.parametrize("lm_head", ["dense", "fp8", "nvfp4"])
def test_empty_patch_then_load_state_dict_is_the_same_model(lm_head):
    """What the checkpoint loader does: build on meta, patch(quantize=False), load by name with assign=True."""
    torch.manual_seed(0)
    model = tiny_model("qwen3")
    adallm.patch(model, lm_head=lm_head, progress=False)
    with torch.device("meta"):
        empty = type(model)(model.config).to(torch.bfloat16)
    adallm.patch(empty, lm_head=lm_head, quantize=False)
    assert type(empty.lm_head) is type(model.lm_head) and empty.lm_head.weight.is_meta
    buffers = dict(empty.named_buffers())
    for name, t in model.state_dict().items():
        assert name in buffers or name in dict(empty.named_parameters()), name
        if name in buffers:
            assert buffers[name].shape == t.shape and buffers[name].dtype == t.dtype, name
    empty.load_state_dict(model.state_dict(), assign=True, strict=True)
    # Non-persistent buffers (RoPE inv_freq) are not in a state dict: a loader computes them; copy them here.
    for (name, b), (_, src) in zip(empty.named_buffers(), model.named_buffers()):
        if b.is_meta:
            owner, _, leaf = name.rpartition(".")
            empty.get_submodule(owner)._buffers[leaf] = src
    ids = torch.randint(1, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(empty(ids).logits, model(ids).logits)


def test_nvfp4_lm_head():
    torch.manual_seed(0)
    patched, ref, ref64 = reference_models("qwen3", lm_head="nvfp4")
    assert isinstance(patched.lm_head, NVFP4Linear)
    ids = torch.randint(1, 256, (1, 10))
    mask = torch.ones_like(ids)
    out = [teacher_force(m, adallm.Fp8KVCache(m.config, 16) if m is patched else None, ids, [10], mask)
           for m in (patched, ref, ref64)]
    scale = out[2].abs().max()
    assert (out[0] - out[2]).abs().max() <= 2 * (out[1] - out[2]).abs().max() + 1e-3 * scale


def test_fp8_lm_head():
    """lm_head="fp8": an FP8Linear (e4m3 codes, one fp32 scale per row) whose logits are those of its dequantized
    weight, close to the dense head's (an NVFP4 head is off by ~3x more); generate runs with it."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = tiny_model("qwen3")
    dense_w = model.lm_head.weight.detach().clone()
    dense = adallm.patch(copy.deepcopy(model), progress=False)  # same decoder weights: the quantizer is deterministic
    adallm.patch(model, lm_head="fp8", progress=False)
    head = model.lm_head
    assert isinstance(head, FP8Linear) and head.weight.dtype == torch.float8_e4m3fn and head.weight.shape == (256, 128)
    assert head.weight_scale.dtype == torch.float32 and head.weight_scale.shape == (256,)
    w = head.dequantize()
    assert not torch.equal(w.to(torch.bfloat16), dense_w)  # really quantized
    assert ((w - dense_w.float()).abs().amax(1) <= dense_w.float().abs().amax(1) / 16).all()  # e4m3: 3 mantissa bits
    ids = torch.randint(1, 256, (2, 10))
    with torch.no_grad():
        logits, h = model(ids).logits.float(), model.model(ids).last_hidden_state.float()
        want = dense(ids).logits.float()
    scale = want.abs().max()
    assert (logits - F.linear(h, w)).abs().max() <= 0.005 * scale
    assert (logits - want).abs().max() <= 0.04 * scale
    tokens, cache = generate(model, ids, new=8)
    assert tokens.shape == (2, 8) and isinstance(cache, adallm.Fp8KVCache)


def test_bad_lm_head_is_refused():
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match=r"lm_head='int8'; choose one of \('dense', 'fp8', 'nvfp4'\)"):
        adallm.patch(model, lm_head="int8", progress=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # refused before patching anything


def test_sampling_and_streamer_run():
    from transformers import TextStreamer

    class Tok:  # the streamer only needs decode
        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    model = tiny_model("qwen3")
    adallm.patch(model, progress=False)
    ids = torch.randint(1, 256, (2, 6))
    tokens, cache = generate(model, ids, new=12, do_sample=True, top_k=8)
    assert tokens.shape == (2, 12) and isinstance(cache, adallm.Fp8KVCache)
    generate(model, ids[:1], new=4, streamer=TextStreamer(Tok()))


def test_unsupported_architecture_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM is not supported.*Qwen3ForCausalLM.*Gemma3ForCausalLM"):
        adallm.patch(model)
