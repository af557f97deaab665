"""Fp8KVCache layers: what is written reads back within e4m3 error (float64 definition), extremes neither
overflow nor vanish, the ring buffer keeps the last window, padding starts, reset, beam reorder."""
import pytest
import torch

from adallm.kv_cache import Fp8CacheLayer, Fp8KVCache, Fp8SlidingWindowCacheLayer

B, H, D = 2, 3, 64


def e4m3_bound(x: torch.Tensor) -> torch.Tensor:
    """Largest round-trip error per element: half an e4m3 ulp relative (2^-4) for normal values; half the
    subnormal step (2^-10) times the row scale (amax/448) below 2^-6 of it. x: float64 [..., D]."""
    scale = x.abs().amax(-1, keepdim=True) / 448
    return torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)


def append_token(layer, k, v):
    """A decode step's write (the attention module writes with qk_norm_rope_kv_write; the bookkeeping is this)."""
    torch.ops.adallm.fp8_kv_write(k, v, layer.keys, layer.values, layer.key_scale, layer.value_scale,
                                  layer.next_position())
    return layer.advance()


def write(layer, x_k, x_v, chunks):
    a = 0
    for b in chunks:
        if b - a == 1:
            append_token(layer, x_k[:, :, a:b], x_v[:, :, a:b])
        else:
            layer.write_chunk(x_k[:, :, a:b], x_v[:, :, a:b], None)
        a = b


def test_round_trip_within_e4m3_error():
    torch.manual_seed(0)
    k = (torch.randn(B, H, 20, D) * torch.logspace(-3, 2, 20).view(1, 1, 20, 1)).to(torch.bfloat16)
    v = torch.randn(B, H, 20, D).to(torch.bfloat16)
    layer = Fp8CacheLayer(max_cache_len=32)
    write(layer, k, v, [12, 13, 14, 20])
    assert layer.host_length() == 20 and int(layer.length) == 20
    k_back, v_back, lo = layer.read_prefix(torch.float32)
    assert lo == 0
    for orig, back in ((k, k_back), (v, v_back)):
        err = (back.double() - orig.double()).abs()
        assert (err <= e4m3_bound(orig.double())).all()
        assert err.max() > 0  # it is really FP8


@pytest.mark.parametrize("magnitude", [1e4, 1e-6])
def test_extreme_values_neither_overflow_nor_vanish(magnitude):
    torch.manual_seed(0)
    x = (torch.randn(B, H, 5, D) * magnitude).to(torch.bfloat16)
    x[0, 0, 0] = 0  # an all-zero row
    layer = Fp8CacheLayer(max_cache_len=8)
    layer.write_chunk(x, -x, None)
    k_back, v_back, _ = layer.read_prefix(torch.float32)
    assert torch.isfinite(k_back).all() and torch.isfinite(layer.key_scale).all()
    assert (k_back[0, 0, 0] == 0).all()
    err = (k_back.double() - x.double()).abs()
    assert (err <= e4m3_bound(x.double())).all()
    nonzero = x.double().abs() > magnitude * 0.05
    assert (k_back.double()[nonzero] != 0).all() and torch.equal(v_back, -k_back)


def test_sliding_layer_is_a_ring_of_the_last_window():
    torch.manual_seed(0)
    window, total = 8, 23
    k, v = torch.randn(2, B, H, total, D).to(torch.bfloat16)
    layer = Fp8SlidingWindowCacheLayer(max_cache_len=100, sliding_window=window)
    assert layer.max_cache_len == window and layer.keys is None
    write(layer, k, v, [13, 14, 15, 20, 21, 22, 23])  # a prompt longer than the window, decode, a chunk
    k_back, v_back, lo = layer.read_prefix(torch.float32)
    assert lo == total - window and layer.keys.shape == (B, H, window, D)
    err = (k_back.double() - k[:, :, lo:].double()).abs()
    assert (err <= e4m3_bound(k[:, :, lo:].double())).all()
    # position p sits in slot p % L
    last = layer.keys[:, :, (total - 1) % window].double() * layer.key_scale[:, :, (total - 1) % window, None]
    assert (last - k[:, :, total - 1].double()).abs().le(e4m3_bound(k[:, :, total - 1].double())).all()


def test_full_layer_refuses_to_overflow():
    layer = Fp8CacheLayer(max_cache_len=4)
    x = torch.randn(1, 1, 4, D).to(torch.bfloat16)
    layer.write_chunk(x, x, None)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        layer.next_position()


def test_padding_start_reset_and_reorder():
    layer = Fp8CacheLayer(max_cache_len=16)
    x = torch.randn(3, H, 6, D).to(torch.bfloat16)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    layer.write_chunk(x, x, valid)
    assert layer.start.tolist() == [2, 0, 5]
    before = layer.keys.float().clone()
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert layer.start.tolist() == [5, 2, 2] and torch.equal(layer.keys.float()[1], before[0])
    layer.reset()
    assert layer.host_length() == 0 and int(layer.length) == 0 and layer.start.tolist() == [0, 0, 0]


def test_cache_follows_layer_types_and_rejects_others():
    from transformers import Gemma3TextConfig
    cfg = Gemma3TextConfig(num_hidden_layers=3, sliding_window=5,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cache = Fp8KVCache(cfg, 50)
    assert [type(layer) for layer in cache.layers] == [Fp8SlidingWindowCacheLayer, Fp8CacheLayer,
                                                       Fp8SlidingWindowCacheLayer]
    assert cache.get_max_length() == 50 and cache.get_seq_length() == 0 and cache.is_compileable
    cfg.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        Fp8KVCache(cfg, 50)
    with pytest.raises(RuntimeError, match="adallm.patch"):
        cache.update(torch.zeros(1, 1, 1, D), torch.zeros(1, 1, 1, D), 0)


def test_kv_bytes_report_counts_window_sized_sliding_layers():
    """`adallm bench`'s KV report: 2 sliding layers (window 8) and 1 full layer, Hkv 2, D 64, 64 tokens:
    K and V are 1 byte per element plus a 4-byte scale per (token, head)."""
    from transformers import Gemma3TextConfig

    from adallm.bench import kv_cache_bytes
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    kv = kv_cache_bytes(cfg, 64)
    assert kv["fp8_bytes"] == 2 * 2 * (8 + 8 + 64) * (64 + 4)
    assert kv["bf16_full_bytes"] == 2 * 3 * 2 * 64 * 64 * 2
    assert kv["fp8_bytes_per_token"] == kv["fp8_bytes"] / 64
