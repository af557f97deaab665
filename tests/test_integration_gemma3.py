"""adallm.patch on tiny random Gemma3 models (sliding window 8, layers sliding/sliding/full): equivalence with
the dequantized transformers model, prompts longer than the window, the multimodal model's text tower."""
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
