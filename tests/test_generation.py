"""adallm's decode loop (adallm/generation.py) against transformers' own, on CPU. Here each step is a plain
eager call (on CUDA the step is compiled and replayed as a CUDA graph: tests/test_integration_cuda.py), so
tokens, scores, stopping, streaming and the cache must equal transformers' loop exactly."""
import pytest
import torch
from integration_common import CollectingStreamer, DirectStep, cache_kw, left_pad, tiny_model

import adallm
from adallm import generation

FAMILIES = ["qwen3", "qwen3_moe", "gemma3"]


@pytest.fixture
def loop_on_cpu(monkeypatch):
    monkeypatch.setattr(generation, "_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(generation, "_compiled_decode_step", generation._decode_step)
    monkeypatch.setattr(generation, "_GraphStep", DirectStep)


def both_loops(model, seed=0, **kw):
    """generate through adallm's loop and through transformers' (disable_compile routes the call there)."""
    outs = []
    for hf in (False, True):
        torch.manual_seed(seed)
        streamer = CollectingStreamer() if kw.get("input_ids").shape[0] == 1 else None
        out = model.generate(**kw, streamer=streamer, return_dict_in_generate=True, output_scores=True,
                             disable_compile=hf)
        cache = getattr(out, "cache", None) or out.past_key_values
        outs.append((out.sequences, torch.stack(out.scores), streamer and streamer.seen, int(cache.get_seq_length())))
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_greedy_and_sampling_equal_transformers_loop(family, loop_on_cpu):
    torch.manual_seed(0)
    model = tiny_model(family)
    adallm.patch(model, progress=False)
    model.generation_config.eos_token_id = None
    ids, mask = left_pad([torch.randint(1, model.config.vocab_size, (n,)) for n in (14, 9)])
    for sample in ({}, dict(do_sample=True, top_k=30, temperature=0.8)):
        ours, theirs = both_loops(model, input_ids=ids, attention_mask=mask, max_new_tokens=20, **sample)
        assert torch.equal(ours[0], theirs[0]), (sample, ours[0], theirs[0])
        assert torch.equal(ours[1], theirs[1])
        assert ours[3] == theirs[3] == 14 + 19


def test_eos_stop_streaming_and_cache_equal_transformers_loop(loop_on_cpu):
    """Every row done: adallm's loop learns it a step late and undoes that step."""
    torch.manual_seed(0)
    model = tiny_model("qwen3")
    adallm.patch(model, progress=False)
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, model.config.vocab_size, (1, 12))
    free = model.generate(ids, max_new_tokens=24, do_sample=False)[0, 12:]
    eos = int(free[7])
    first = int((free == eos).nonzero()[0])
    model.generation_config.eos_token_id = eos
    ours, theirs = both_loops(model, input_ids=ids, max_new_tokens=24, do_sample=False)
    assert ours[0].tolist() == theirs[0].tolist() == [ids[0].tolist() + free[:first + 1].tolist()]
    assert torch.equal(ours[1], theirs[1])
    assert ours[2] == theirs[2]  # streamed: the prompt, each token, end
    assert ours[3] == theirs[3] == 12 + first


def test_cache_too_small_is_a_clear_error(loop_on_cpu):
    model = tiny_model("qwen3")
    adallm.patch(model, progress=False)
    cache = adallm.Fp8KVCache(model.config, 16)
    with pytest.raises(ValueError, match="needs 19 positions but the FP8 KV cache holds 16"):
        model.generate(torch.randint(1, 100, (1, 8)), max_new_tokens=12, min_new_tokens=12, **{cache_kw(model): cache})
