"""adallm's decode loop (adallm/generation.py) against transformers' own, on CPU. Here each step is a plain
eager call (on CUDA the step is compiled and replayed as a CUDA graph: tests/test_integration_cuda.py), so
tokens, scores, stopping, streaming and the cache must equal transformers' loop exactly."""
import pytest
import torch
from integration_common import CollectingStreamer, DirectStep, cache_kw, left_pad, tiny_model, tiny_multimodal_gemma3

import adallm
from adallm import generation

FAMILIES = ["qwen3", "qwen3_moe", "gemma3"]


@pytest.fixture
def loop_on_cpu(monkeypatch):
    monkeypatch.setattr(generation, "_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(generation, "_compiled_decode_step", generation._decode_step)
    monkeypatch.setattr(generation, "_GraphStep", DirectStep)


def both_loops(model, seed=0, **kw):
    """generate through adallm's loop and through transformers' (disable_compile routes the call there):
    for each, (sequences, scores, raw logits, streamed tokens or None, cache length)."""
    outs = []
    for hf in (False, True):
        torch.manual_seed(seed)
        streamer = CollectingStreamer() if kw.get("input_ids").shape[0] == 1 else None
        out = model.generate(**kw, streamer=streamer, return_dict_in_generate=True, output_scores=True,
                             output_logits=True, disable_compile=hf)
        cache = getattr(out, "cache", None) or out.past_key_values
        outs.append((out.sequences, torch.stack(out.scores), torch.stack(out.logits), streamer and streamer.seen,
                     int(cache.get_seq_length())))
    return outs


def patched(family: str = "qwen3", model=None):
    """A seeded tiny model of `family` (or `model`), patched, with no EOS (the tests set one when they need it)."""
    torch.manual_seed(0)
    model = model if model is not None else tiny_model(family)
    adallm.patch(model, progress=False)
    model.generation_config.eos_token_id = None
    return model


def assert_same(ours, theirs):
    assert torch.equal(ours[0], theirs[0]), (ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[2], theirs[2])
    assert ours[3] == theirs[3] and ours[4] == theirs[4]


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_greedy_and_sampling_equal_transformers_loop(family, loop_on_cpu):
    model = patched(family)
    ids, mask = left_pad([torch.randint(1, model.config.vocab_size, (n,)) for n in (14, 9)])
    for sample in ({}, dict(do_sample=True, top_k=30, temperature=0.8)):
        ours, theirs = both_loops(model, input_ids=ids, attention_mask=mask, max_new_tokens=20, **sample)
        assert_same(ours, theirs)
        assert ours[4] == 14 + 19


def test_eos_stop_streaming_and_cache_equal_transformers_loop(loop_on_cpu):
    """Every row done: adallm's loop learns it a step late and undoes that step."""
    model = patched("qwen3")
    ids = torch.randint(1, model.config.vocab_size, (1, 12))
    free = model.generate(ids, max_new_tokens=24, do_sample=False)[0, 12:]
    eos = int(free[7])
    first = int((free == eos).nonzero()[0])
    model.generation_config.eos_token_id = eos
    ours, theirs = both_loops(model, input_ids=ids, max_new_tokens=24, do_sample=False)
    assert_same(ours, theirs)  # the streamed lists too: the prompt, each token, "end"
    assert ours[0].tolist() == [ids[0].tolist() + free[:first + 1].tolist()]
    assert ours[4] == 12 + first
    # One new token: no decode step at all.
    assert_same(*both_loops(model, input_ids=ids, max_new_tokens=1, do_sample=False))


def test_gemma3_multimodal_text_equals_transformers_loop(loop_on_cpu):
    """The VLM's forward takes the decode step's arguments (its text tower is patched)."""
    model = patched(model=tiny_multimodal_gemma3())
    ids = torch.randint(1, 250, (1, 12))
    assert_same(*both_loops(model, input_ids=ids, max_new_tokens=10, do_sample=False))


def test_one_row_stopping_early_is_padded_as_transformers_does(loop_on_cpu):
    model = patched("gemma3")
    ids, mask = left_pad([torch.randint(1, model.config.vocab_size, (n,)) for n in (14, 9)])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[:, 14:]
    model.generation_config.eos_token_id = int(free[0, 4])
    model.generation_config.pad_token_id = 0
    ours, theirs = both_loops(model, input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert_same(ours, theirs)


def test_continuation_from_a_user_cache_equals_transformers_loop(loop_on_cpu):
    """A second turn on the cache the first turn filled (prefill over a cached prefix, then decode)."""
    model = patched("gemma3")
    ids = torch.randint(1, model.config.vocab_size, (1, 10))
    user_turn = torch.randint(1, model.config.vocab_size, (1, 5))
    results = []
    for hf in (False, True):
        cache = adallm.Fp8KVCache(model.config, 64)
        first = model.generate(ids, max_new_tokens=6, do_sample=False, disable_compile=hf, **{cache_kw(model): cache})
        turn2 = torch.cat([first, user_turn], dim=1)
        second = model.generate(turn2, max_new_tokens=8, do_sample=False, disable_compile=hf,
                                **{cache_kw(model): cache})
        results.append((second, int(cache.get_seq_length())))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] == 21 + 7


def test_cache_too_small_is_a_clear_error(loop_on_cpu):
    model = tiny_model("qwen3")
    adallm.patch(model, progress=False)
    cache = adallm.Fp8KVCache(model.config, 16)
    with pytest.raises(ValueError, match="needs 19 positions but the FP8 KV cache holds 16"):
        model.generate(torch.randint(1, 100, (1, 8)), max_new_tokens=12, min_new_tokens=12, **{cache_kw(model): cache})


def test_max_cache_len_sizes_the_fp8_cache():
    """generate(max_cache_len=N) (what `adallm bench --context` passes) sizes the FP8 cache for N tokens."""
    model = patched("gemma3")
    out = model.generate(torch.randint(1, 200, (1, 6)), max_new_tokens=3, max_cache_len=100,
                         return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert cache.capacity == 100 and [layer.max_cache_len for layer in cache.layers] == [8, 8, 100]


def test_compile_failure_is_a_clear_error(loop_on_cpu, monkeypatch):
    def failing(model):
        def step(ids, pos, cache):
            raise torch._dynamo.exc.TorchDynamoException("graph break in some layer")
        return step

    monkeypatch.setattr(generation, "_compiled_decode_step", failing)
    model = patched("qwen3")
    with pytest.raises(RuntimeError, match="graph break in some layer.*disable_compile=True"):
        model.generate(torch.randint(1, 200, (1, 6)), max_new_tokens=4)
    assert model.generate(torch.randint(1, 200, (1, 6)), max_new_tokens=4, disable_compile=True).shape == (1, 10)
