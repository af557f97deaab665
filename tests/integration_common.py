"""Shared pieces of the integration tests: tiny random models of each family, the reference model, the
reference FP8 cache, and the equivalence checks every family runs.

The reference for a patched model is the UN-patched transformers model whose linear weights are the
NVFP4-dequantized weights of the patched one (same math, transformers' own attention and masks). Its
cache is `EmulatedFp8Cache`: transformers' DynamicCache whose layers round stored K/V through e4m3 with
one scale per (token, head), re-derived here from the definition. It reproduces the semantics AdaLLM's
attention promises: a chunk of S > 1 new tokens attends to the cached prefix as stored (FP8) and to
itself in the activation dtype; a single new token (decode) reads everything, itself included, from FP8.
Global scales are snapped to powers of two after quantizing (still a valid NVFP4 weight) so that the
dequantized weights are exact in bf16 and both models hold bit-identical weights.
"""
from __future__ import annotations

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.streamers import BaseStreamer

import adallm
from adallm.linear import NVFP4Linear
from adallm.mlp import NVFP4Experts
from adallm_ops.reference import dequantize_nvfp4

E4M3_MAX = 448.0


# ---------------------------------------------------------------------------------------------------
# Tiny random models


def tiny_model(family: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", **overrides):
    """A tiny random bf16 model of `family` (head_dim 64: the decode op's smallest), eval mode, sdpa."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)
    common = dict(vocab_size=256, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=1024, attn_implementation="sdpa")
    if family == "qwen3":
        cls, cfg = Qwen3ForCausalLM, Qwen3Config(**common, intermediate_size=256, num_hidden_layers=2)
    elif family == "qwen3_moe":
        cls, cfg = Qwen3MoeForCausalLM, Qwen3MoeConfig(**common, intermediate_size=256, moe_intermediate_size=64,
                                                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                                       decoder_sparse_step=1, mlp_only_layers=[1], num_hidden_layers=2)
    elif family == "gemma3":
        cls, cfg = Gemma3ForCausalLM, Gemma3TextConfig(
            **common, intermediate_size=256, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=48,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = cls(cfg).to(device, dtype).eval()
    if family == "qwen3_moe":
        model.set_experts_implementation("eager")  # the float64 reference: grouped_mm has no float64 kernel
    return model


def patched_and_reference(model, **patch_kwargs):
    """(patched model, its dequantized un-patched reference); `model` itself becomes the patched one."""
    ref = copy.deepcopy(model)
    adallm.patch(model, progress=False, **patch_kwargs)
    _snap_global_scales(model)
    _load_dequantized(ref, model)
    return model, ref


def _snap_global_scales(model) -> None:
    for m in model.modules():
        for name in ("weight_global_scale", "gate_up_weight_global_scale", "down_weight_global_scale"):
            g = getattr(m, name, None)
            if isinstance(g, torch.Tensor):
                g.copy_(torch.exp2(torch.log2(g).round()))


def _load_dequantized(ref, patched) -> None:
    """Copies every NVFP4 weight of `patched`, dequantized, into the matching nn.Linear / expert params of `ref`."""
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in patched.named_modules():
            if isinstance(m, NVFP4Linear):
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                targets = [f"{parent}.{p}" if parent else p for p in m.parts] if m.parts else [name]
                for t, w in zip(targets, m.dequantize().split(m.part_sizes or [m.out_features])):
                    dst = ref_modules[t].weight
                    assert torch.equal(w.to(dst.dtype).float(), w), "dequantized weight not exact in the model dtype"
                    dst.copy_(w)
            elif isinstance(m, NVFP4Experts):
                for kind in ("gate_up", "down"):
                    w = dequantize_nvfp4(getattr(m, f"{kind}_weight"), getattr(m, f"{kind}_weight_scale"),
                                         getattr(m, f"{kind}_weight_global_scale"))
                    getattr(ref_modules[name], f"{kind}_proj").copy_(w)


# ---------------------------------------------------------------------------------------------------
# The reference FP8 cache


def fake_fp8(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] rounded through e4m3 with scale = amax over D / 448 (1 for a zero row), back in x.dtype."""
    xf = x.double()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).float().double()
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.double() * scale).to(x.dtype)


class _EmulatedFp8:
    def update(self, key_states, value_states, *args, **kwargs):
        s = key_states.shape[-2]
        keys, values = super().update(fake_fp8(key_states), fake_fp8(value_states))
        if s > 1:  # a multi-token chunk sees its own K/V unrounded
            keys = torch.cat((keys[..., :-s, :], key_states), dim=-2)
            values = torch.cat((values[..., :-s, :], value_states), dim=-2)
        return keys, values


class _EmulatedFullLayer(_EmulatedFp8, DynamicLayer):
    pass


class _EmulatedSlidingLayer(_EmulatedFp8, DynamicSlidingWindowLayer):
    pass


def EmulatedFp8Cache(config) -> DynamicCache:  # noqa: N802  (a cache factory, named like the cache it builds)
    cache = DynamicCache(config=config)
    cache.layers = [_EmulatedSlidingLayer(sliding_window=layer.sliding_window) if layer.is_sliding
                    else _EmulatedFullLayer() for layer in cache.layers]
    return cache


def cache_kw(model) -> str:
    from adallm.kv_cache import cache_kwarg_name
    return cache_kwarg_name(model)


# ---------------------------------------------------------------------------------------------------
# Running the models


def reference_models(family: str, dtype: torch.dtype = torch.bfloat16, model=None, device: str = "cpu",
                     **patch_kwargs):
    """(patched, reference in the same dtype, reference in float64) for a fresh tiny model of `family`."""
    model = tiny_model(family, dtype, device) if model is None else model
    patched, ref = patched_and_reference(model, **patch_kwargs)
    return patched, ref, copy.deepcopy(ref).double()


def tiny_multimodal_gemma3():
    """A tiny random bf16 Gemma3ForConditionalGeneration (SigLIP tower, 3 text layers, window 8), sdpa."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    text = Gemma3TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=8,
                            query_pre_attn_scalar=48, max_position_embeddings=1024,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=255,
                       boi_token_index=253, eoi_token_index=254)
    cfg._attn_implementation = "sdpa"
    return Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16).eval()


def generate(model, ids, mask=None, new=64, cache=None, **kw):
    """Greedy by default. Returns (new tokens [B, new], the cache generate used)."""
    cache_arg = {} if cache is None else {cache_kw(model): cache}
    ids, mask = ids.to(model.device), None if mask is None else mask.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             return_dict_in_generate=True, **{"do_sample": False, **cache_arg, **kw})
    used = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.sequences[:, ids.shape[1]:].cpu(), used


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (ids [B, n], attention mask [B, n]), padded on the left."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
    return ids, mask


def teacher_force(model, cache, tokens: torch.Tensor, splits: list[int], mask: torch.Tensor) -> torch.Tensor:
    """Feeds tokens[:, a:b] for consecutive split points (one forward each, like generate: position ids
    from the mask) into `cache`. Returns float64 logits [B, splits[-1], V]."""
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out, a = [], 0
    for b in splits:
        with torch.no_grad():
            out.append(model(tokens[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], use_cache=True,
                             **{cache_kw(model): cache}).logits.double().cpu())
        a = b
    return torch.cat(out, dim=1)


def three_way(models, fp8: bool, tokens, splits, mask):
    """Teacher-forced logits of (patched, reference, float64 reference); FP8 caches (Fp8KVCache for the
    patched model, EmulatedFp8Cache for the references) or transformers' DynamicCache for all three."""
    out = []
    for i, m in enumerate(models):
        if fp8:
            cache = adallm.Fp8KVCache(m.config, tokens.shape[1]) if i == 0 else EmulatedFp8Cache(m.config)
        else:
            cache = DynamicCache(config=m.config)
        out.append(teacher_force(m, cache, tokens, splits, mask))
    return out


# ---------------------------------------------------------------------------------------------------
# Assertions


def assert_fa3_rule(lp, lt, l64, valid, what: str) -> tuple[float, float]:
    """Patched error vs the float64 reference <= 2x transformers' own error in the same dtype, + a floor of
    1e-3 of the largest logit (the rule STYLE.md takes from FlashAttention-3). Returns both errors / scale."""
    scale = l64[valid].abs().max()
    err_p = (lp - l64).abs()[valid].max()
    err_t = (lt - l64).abs()[valid].max()
    assert err_p <= 2 * err_t + 1e-3 * scale, (
        f"{what}: patched logits off the float64 reference by {err_p / scale:.4f} of the largest logit; "
        f"transformers in the same dtype is off by {err_t / scale:.4f}")
    return float(err_p / scale), float(err_t / scale)


def assert_greedy_consistent(tokens: torch.Tensor, lt: torch.Tensor, l64: torch.Tensor, what: str,
                             eos: int | list[int] | None = None) -> float:
    """tokens [B, n]: a patched model's greedy choices; lt, l64 [B, n, V]: the references' teacher-forced
    logits predicting them. Each token must be the float64 reference's argmax, or a near-tie: its logit
    below the max by at most 2x transformers' own error at that step (+ 1e-3 of the largest logit).
    `generate` forbids EOS (min_new_tokens), so the references' EOS logits are left out too.
    Exact agreement between two bf16 implementations is not a property either has (transformers' bf16
    model disagrees with its own float64 run at such near-ties), so this is the fair check; a broken mask
    or cache shows up as large margins. Returns the share of exact argmax agreement (asserted >= 0.9)."""
    noise = (lt - l64).abs().amax(-1)
    scale = l64.abs().amax()
    if eos is not None:
        l64 = l64.clone()
        l64[..., eos] = float("-inf")
    margin = l64.amax(-1) - l64.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    bad = margin > 2 * noise + 1e-3 * scale
    assert not bad.any(), (f"{what}: {int(bad.sum())} greedy tokens are not near the reference's best "
                           f"(worst margin {float((margin - 2 * noise)[bad].max() / scale):.4f} of the largest logit)")
    agree = float((l64.argmax(-1) == tokens).double().mean())
    assert agree >= 0.9, f"{what}: only {agree:.0%} of greedy tokens are the reference's argmax"
    return agree


# ---------------------------------------------------------------------------------------------------
# The checks every family runs


def check_logits(family: str, model=None, device: str = "cpu") -> None:
    """Left-padded batch: prefill (12 tokens, longer than Gemma3's window of 8), 6 decode steps, a 5-token
    continuation chunk over the cached prefix, 4 more decode steps; FP8 path and the user-cache path."""
    torch.manual_seed(0)
    models = reference_models(family, model=model, device=device)
    vocab = models[0].config.get_text_config().vocab_size
    ids, mask = left_pad([torch.randint(1, vocab, (12,)), torch.randint(1, vocab, (8,))])
    more = torch.randint(1, vocab, (2, 15))
    tokens = torch.cat((ids, more), dim=1)
    mask = torch.cat((mask, torch.ones_like(more)), dim=1)
    splits = [12, 13, 14, 15, 16, 17, 18, 23, 24, 25, 26, 27]
    valid = mask.bool()
    assert_fa3_rule(*three_way(models, True, tokens, splits, mask), valid, f"{family} FP8 cache")
    assert_fa3_rule(*three_way(models, False, tokens, splits, mask), valid, f"{family} DynamicCache")


def check_greedy(family: str, prompt_len: int = 12, new: int = 64, device: str = "cpu") -> None:
    """generate (default cache: Fp8KVCache) on a left-padded batch vs the references, teacher-forced."""
    torch.manual_seed(1)
    patched, ref, ref64 = reference_models(family, device=device)
    vocab = patched.config.vocab_size
    ids, mask = left_pad([torch.randint(1, vocab, (prompt_len,)), torch.randint(1, vocab, (prompt_len - 5,))])
    tokens, cache = generate(patched, ids, mask, new)
    assert isinstance(cache, adallm.Fp8KVCache), f"generate used {type(cache).__name__}, not Fp8KVCache"
    seq = torch.cat((ids, tokens), dim=1)
    full_mask = torch.cat((mask, torch.ones_like(tokens)), dim=1)
    splits = list(range(prompt_len, seq.shape[1]))  # prefill, then one token per step (the last is not fed)
    lt, l64 = (teacher_force(m, EmulatedFp8Cache(m.config), seq, splits, full_mask)[:, prompt_len - 1:]
               for m in (ref, ref64))
    assert_greedy_consistent(tokens, lt, l64, f"{family} greedy, prompt {prompt_len}",
                             patched.generation_config.eos_token_id)


def check_batch_matches_alone(family: str, lengths=(20, 9), new: int = 32, device: str = "cpu") -> None:
    """Each row of a left-padded batch computes what it computes alone: the alone greedy continuation,
    teacher-forced through the batch, gives the same logits within bf16 noise and the same greedy choices
    up to near-ties. Noise measured, as a fraction of the largest logit: CPU up to 1.5% (Gemma3's padded
    row), CUDA up to 2.6% (its SDPA prefill kernels round differently with and without a mask); a padding
    or window bug costs tens of %. The alone tokens come from eager decoding, the same path as the
    teacher forcing (a compiled decode step may break near-ties the other way)."""
    torch.manual_seed(2)
    model = tiny_model(family, device=device)
    adallm.patch(model, progress=False)
    vocab = model.config.vocab_size
    rows = [torch.randint(1, vocab, (n,)) for n in lengths]
    ids, mask = left_pad(rows)
    n = ids.shape[1]
    for i, row in enumerate(rows):
        alone, _ = generate(model, row[None], new=new, disable_compile=True)
        seq_a = torch.cat((row[None], alone), dim=1)
        la = teacher_force(model, adallm.Fp8KVCache(model.config, seq_a.shape[1]), seq_a,
                           list(range(len(row), seq_a.shape[1])), torch.ones_like(seq_a))[0, len(row) - 1:]
        seq_b = torch.cat((ids, alone.expand(len(rows), -1)), dim=1)
        mask_b = torch.cat((mask, torch.ones(len(rows), new, dtype=torch.long)), dim=1)
        lb = teacher_force(model, adallm.Fp8KVCache(model.config, seq_b.shape[1]), seq_b,
                           list(range(n, seq_b.shape[1])), mask_b)[i, n - 1:]
        scale = la.abs().max()
        diff = float((la - lb).abs().max() / scale)
        assert diff <= (0.02 if device == "cpu" else 0.04), f"{family} row {i}: batch and alone logits differ by {diff:.4f} of the largest logit"
        lb_open = lb.clone()
        lb_open[..., model.generation_config.eos_token_id] = float("-inf")  # min_new_tokens forbids EOS in `alone`
        margin = lb_open.amax(-1) - lb.gather(-1, alone[0].unsqueeze(-1)).squeeze(-1)
        assert (margin <= 2 * (la - lb).abs().amax(-1) + 1e-3 * scale).all(), f"{family} row {i}: greedy differs"


def check_continuation(family: str, device: str = "cpu") -> None:
    """Multi-turn: generate 8 tokens into a user Fp8KVCache, append 5 user tokens, generate 8 more with the
    same cache (a chunk over the cached prefix); teacher-forced against the references the same way."""
    torch.manual_seed(3)
    patched, ref, ref64 = reference_models(family, device=device)
    vocab, p = patched.config.vocab_size, 12
    ids = torch.randint(1, vocab, (1, p))
    cache = adallm.Fp8KVCache(patched.config, 64)
    first, _ = generate(patched, ids, new=8, cache=cache)
    user = torch.randint(1, vocab, (1, 5))
    ids2 = torch.cat((ids, first, user), dim=1)
    second, used = generate(patched, ids2, new=8, cache=cache)
    assert used is cache and int(cache.get_seq_length()) == ids2.shape[1] + 7
    seq = torch.cat((ids2, second), dim=1)
    splits = list(range(p, p + 8)) + list(range(ids2.shape[1], seq.shape[1]))  # as the two generate calls fed it
    predicted = list(range(p - 1, p + 7)) + list(range(ids2.shape[1] - 1, seq.shape[1] - 1))
    lt, l64 = (teacher_force(m, EmulatedFp8Cache(m.config), seq, splits, torch.ones_like(seq))[:, predicted]
               for m in (ref, ref64))
    assert_greedy_consistent(torch.cat((first, second), dim=1), lt, l64, f"{family} continuation",
                             patched.generation_config.eos_token_id)


def check_compile(family: str) -> None:
    """torch.compile(fullgraph=True) of the patched model: prefill + 4 decode steps with an Fp8KVCache trace
    without a graph break, hold adallm ops, recompile for neither step, and match eager bit for bit
    (aot_eager: the same ops after functionalization of the in-place cache writes)."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters
    torch.manual_seed(4)
    model = tiny_model(family)
    adallm.patch(model, progress=False)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    ids = torch.randint(1, model.config.vocab_size, (2, 12))

    def run(m):
        cache, outs = adallm.Fp8KVCache(model.config, 32), []
        with torch.no_grad():
            logits = m(ids, use_cache=True, **{cache_kw(model): cache}).logits
            outs.append(logits)
            for step in range(4):
                tok = logits[:, -1:].argmax(-1)
                logits = m(tok, position_ids=torch.full((2, 1), 12 + step), use_cache=True,
                           **{cache_kw(model): cache}).logits
                outs.append(logits)
        return outs

    for e, c in zip(run(model), run(compiled)):
        assert torch.equal(e, c)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(graphs) == 2, f"expected one prefill and one decode graph, got {len(graphs)}"
    ops = [{str(n.target) for n in g.graph.nodes if n.op == "call_function" and "adallm" in str(n.target)}
           for g in graphs]
    assert {"adallm.nvfp4_linear", "adallm.fp8_kv_write"} <= ops[0], ops[0]
    assert {"adallm.qk_norm_rope_kv_write", "adallm.fp8_decode_attention"} <= ops[1], ops[1]


class DirectStep:
    """Stands in for adallm.generation._GraphStep: calls the step every time instead of replaying a graph."""

    def __init__(self, step, cache, ids, pos):
        self.step, self.cache, self.ids = step, cache, ids

    def __call__(self, ids, pos):
        return self.step(ids, pos, self.cache)


class CollectingStreamer(BaseStreamer):
    """A transformers streamer that keeps what it is given: token lists, then "end"."""

    def __init__(self):
        self.seen = []

    def put(self, value):
        self.seen.append(value.reshape(-1).tolist())

    def end(self):
        self.seen.append("end")
