"""adallm.patch on tiny random Gemma3 models (sliding window 8, layers sliding/sliding/full): equivalence with
the dequantized transformers model, prompts longer than the window, the multimodal model's text tower."""
import pytest
import torch
from integration_common import (assert_fa3_rule, check_batch_matches_alone, check_compile, check_continuation,
                                check_greedy, check_logits, three_way)

import adallm
from adallm.attention import NVFP4Attention


def test_logits_match_dequantized_reference():
    check_logits("gemma3")


def test_greedy_64_tokens_prompt_longer_than_window():
    check_greedy("gemma3", prompt_len=20)


def test_batch_rows_match_rows_alone():
    check_batch_matches_alone("gemma3")


def test_multi_turn_continuation():
    check_continuation("gemma3")


def test_compile_fullgraph():
    check_compile("gemma3")


def test_sliding_layers_get_window_sized_ring_buffers():
    from integration_common import tiny_model
    model = tiny_model("gemma3")
    adallm.patch(model, progress=False)
    attn = [layer.self_attn for layer in model.model.layers]
    assert [a.sliding_window for a in attn] == [8, 8, None]
    assert all(abs(a.scaling - 48 ** -0.5) < 1e-12 for a in attn)
    cache = adallm.Fp8KVCache(model.config, 100)
    assert [layer.max_cache_len for layer in cache.layers] == [8, 8, 100]
    assert cache.is_sliding == [True, True, False] and cache.is_compileable


def test_multimodal_text_tower():
    """Gemma3ForConditionalGeneration: the text tower is patched, the vision tower is not, and text logits
    match the dequantized reference (FP8 cache and DynamicCache, prefill + decode)."""
    from integration_common import reference_models, tiny_multimodal_gemma3
    torch.manual_seed(0)
    models = reference_models("gemma3", model=tiny_multimodal_gemma3())
    patched = models[0]
    assert all(isinstance(layer.self_attn, NVFP4Attention) for layer in patched.model.language_model.layers)
    assert any(isinstance(m, torch.nn.Linear) for m in patched.model.vision_tower.modules())
    tokens = torch.randint(1, 250, (1, 16))
    mask = torch.ones_like(tokens)
    splits = [12, 13, 14, 15, 16]
    for fp8 in (True, False):
        assert_fa3_rule(*three_way(models, fp8, tokens, splits, mask), mask.bool(), f"multimodal fp8={fp8}")


@pytest.mark.parametrize("lm_head", ["nvfp4", "fp8"])
def test_quantized_lm_head_keeps_tied_embedding_exact(lm_head, tmp_path):
    """Gemma3 ties lm_head to the input embedding. lm_head="nvfp4" / "fp8" makes lm_head a separate NVFP4Linear /
    FP8Linear: the embedding keeps its exact weights, the logits come from the quantized head (close to the dense
    model's), generate runs, and transformers' tie_weights() (run by from_pretrained after loading, by
    resize_token_embeddings, by users) neither puts the BF16 embedding back into lm_head.weight nor fails on the
    quantized buffer. The saved checkpoint loads back the same tensors (an FP8 head is not stored: from_pretrained
    makes it from the embedding again; logits are not compared there: the reloaded tiny model computes its RoPE
    tables in fp32, this one cast them)."""
    import copy

    import torch.nn.functional as F
    from integration_common import generate, tiny_model

    from adallm.linear import FP8Linear, NVFP4Linear
    # the quantized head's class, its codes' dtype, and its logits' largest error against the dense head's
    cls, dtype, tol = {"nvfp4": (NVFP4Linear, torch.uint8, 0.12), "fp8": (FP8Linear, torch.float8_e4m3fn, 0.04)}[lm_head]
    torch.manual_seed(0)
    model = tiny_model("gemma3")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    dense = adallm.patch(copy.deepcopy(model), progress=False)  # same decoder weights: the quantizer is deterministic
    assert dense.lm_head.weight is dense.model.embed_tokens.weight  # the default keeps the tie
    adallm.patch(model, lm_head=lm_head, progress=False)
    assert isinstance(model.lm_head, cls) and model.lm_head.weight.dtype == dtype
    emb = model.model.embed_tokens.weight
    assert isinstance(emb, torch.nn.Parameter) and emb.dtype == torch.bfloat16 and torch.equal(emb, embed)
    ids = torch.randint(1, 250, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
        h = model.model(ids).last_hidden_state
        want = dense(ids).logits.float()
    head = model.lm_head.dequantize(torch.float32)
    assert not torch.equal(head.to(torch.bfloat16), embed)  # really quantized
    assert (logits.float() - F.linear(h.float(), head)).abs().max() <= 0.02 * logits.float().abs().max()
    assert (logits.float() - want).abs().max() <= tol * want.abs().max()
    tokens, cache = generate(model, ids, new=8)
    assert tokens.shape == (1, 8) and isinstance(cache, adallm.Fp8KVCache)
    model.tie_weights()  # recomputes the mapping from the config
    model.tie_weights(missing_keys=set(), recompute_mapping=False)  # what from_pretrained runs after loading
    assert isinstance(model.lm_head, cls) and model.lm_head.weight.dtype == dtype
    assert torch.equal(model.model.embed_tokens.weight, embed)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    adallm.save_pretrained(model, str(tmp_path))
    loaded = adallm.from_pretrained(str(tmp_path), device="cpu", lm_head=lm_head, progress=False)
    assert isinstance(loaded.lm_head, cls) and torch.equal(loaded.model.embed_tokens.weight, embed)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float())
                                        for k in a if k.startswith("lm_head."))
