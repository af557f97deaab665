"""The `adallm` op library: every schema, its documented Python wrapper and its fake impl, in one place.

Implementations live elsewhere and register against these schemas:
  CPU  -> adallm_ops/reference.py  (plain torch; the oracle the CUDA kernels are tested against)
  CUDA -> csrc/*.cu                 (TORCH_LIBRARY_IMPL(adallm, CUDA, m), loaded by adallm_ops/_build.py)

Layouts (the canonical on-disk layouts; kernels read them as they are, nothing is repacked):
  NVFP4 weight [N, K]:
    weight               uint8          [N, K/2]   element 2i in the low nibble, 2i+1 in the high one;
                                                   nibble = sign bit (8) | E2M1 magnitude code (0..7)
    weight_scale         float8_e4m3fn  [N, K/16]  one scale per 16 consecutive elements along K
    weight_global_scale  float32        []         per-tensor scale
    w[n, k] = e2m1(code[n, k]) * float(weight_scale[n, k // 16]) * weight_global_scale
  FP8 weight [N, K] (the lm_head's option; the same per-row recipe as the KV cache, reference.fp8_quantize_rows):
    weight               float8_e4m3fn  [N, K]
    weight_scale         float32        [N]        w[n, k] = float(weight[n, k]) * weight_scale[n]
  FP8 KV cache (one per layer, for K and for V):
    cache                float8_e4m3fn  [B, Hkv, L, D]  token at absolute cache position p sits in slot p % L
                                                        (a global layer has L = max length, so slot = p;
                                                        a sliding-window layer has L = window: a ring buffer)
    scale                float32        [B, Hkv, L]     per (token, head): value = float(cache) * scale
"""
from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
E2M1_MAX = 6.0  # largest E2M1 magnitude
NVFP4_BLOCK = 16  # elements per E4M3 block scale

_defs = {
    "nvfp4_linear": (
        "nvfp4_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_global_scale, "
        "Tensor? bias, Tensor? residual=None, Tensor? norm_weight=None, float norm_eps=0.0) -> Tensor"
    ),
    "fp8_linear": "fp8_linear(Tensor x, Tensor weight, Tensor weight_scale) -> Tensor",
    "nvfp4_linear_glu": (
        "nvfp4_linear_glu(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_global_scale, str activation, "
        "Tensor? norm_weight=None, float norm_eps=0.0) -> Tensor"
    ),
    "nvfp4_quantize": "nvfp4_quantize(Tensor x, Tensor global_scale) -> (Tensor, Tensor)",
    "nvfp4_moe_linear": (
        "nvfp4_moe_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_global_scale, "
        "Tensor expert_ids) -> Tensor"
    ),
    "fp8_kv_write": (
        "fp8_kv_write(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) k_scale, "
        "Tensor(d!) v_scale, Tensor positions) -> ()"
    ),
    "qk_norm_rope_kv_write": (
        "qk_norm_rope_kv_write(Tensor qkv, Tensor q_norm_weight, Tensor k_norm_weight, Tensor cos, Tensor sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) k_scale, Tensor(d!) v_scale, Tensor position, "
        "float eps, float weight_offset) -> Tensor"
    ),
    "moe_router_topk": "moe_router_topk(Tensor x, Tensor weight, int top_k, bool renormalize) -> (Tensor, Tensor, Tensor)",
    "fp8_decode_attention": (
        "fp8_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scale, Tensor v_scale, "
        "Tensor cache_seqlens, Tensor cache_start, float sm_scale, int sliding_window, float softcap) -> Tensor"
    ),
}
for _name, _schema in _defs.items():
    torch.library.define(f"adallm::{_schema.split('(', 1)[0]}", "(" + _schema.split("(", 1)[1])
OP_NAMES = tuple(_defs)  # every op of the library (the CUDA build registers each; opcheck tests each)


# ---------------------------------------------------------------------------------------------------
# Argument checks shared by the fake impls and the CPU reference (the CUDA impls repeat them in C++
# with TORCH_CHECK, so a bad call fails the same way on every device and while tracing).


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"adallm: {msg}")


def check_nvfp4_weight(weight: torch.Tensor, weight_scale: torch.Tensor, global_scale: torch.Tensor,
                       experts: bool = False) -> tuple[int, int]:
    """Validates an NVFP4 weight triple; returns (N, K). With experts=True a leading E dim is expected."""
    lead = 1 if experts else 0
    _require(weight.dtype == torch.uint8, f"weight must be uint8 (packed FP4), got {weight.dtype}")
    _require(weight_scale.dtype == torch.float8_e4m3fn,
             f"weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    _require(global_scale.dtype == torch.float32,
             f"weight_global_scale must be float32, got {global_scale.dtype}")
    _require(weight.dim() == 2 + lead, f"weight must be {2 + lead}-D, got shape {tuple(weight.shape)}")
    _require(weight.is_contiguous() and weight_scale.is_contiguous(), "weight and weight_scale must be contiguous")
    n, k = weight.shape[lead], weight.shape[lead + 1] * 2
    _require(k % NVFP4_BLOCK == 0, f"K = {k} must be a multiple of {NVFP4_BLOCK}")
    _require(tuple(weight_scale.shape) == tuple(weight.shape[:lead]) + (n, k // NVFP4_BLOCK),
             f"weight_scale shape {tuple(weight_scale.shape)} does not match weight {tuple(weight.shape)} "
             f"(expected {tuple(weight.shape[:lead]) + (n, k // NVFP4_BLOCK)})")
    _require(tuple(global_scale.shape) == tuple(weight.shape[:lead]),
             f"weight_global_scale must have shape {tuple(weight.shape[:lead])}, got {tuple(global_scale.shape)}")
    _require(weight.device == weight_scale.device == global_scale.device,
             "weight, weight_scale and weight_global_scale must be on one device")
    return n, k


def check_fp8_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[int, int]:
    """Validates an FP8 weight pair (e4m3 [N, K], fp32 [N]); returns (N, K)."""
    _require(weight.dtype == torch.float8_e4m3fn, f"weight must be float8_e4m3fn, got {weight.dtype}")
    _require(weight_scale.dtype == torch.float32, f"weight_scale must be float32, got {weight_scale.dtype}")
    _require(weight.dim() == 2, f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    _require(k % 16 == 0, f"K = {k} must be a multiple of 16")
    _require(tuple(weight_scale.shape) == (n,), f"weight_scale must have shape ({n},), got {tuple(weight_scale.shape)}")
    _require(weight.is_contiguous() and weight_scale.is_contiguous(), "weight and weight_scale must be contiguous")
    _require(weight.device == weight_scale.device, "weight and weight_scale must be on one device")
    return n, k


def check_activation(x: torch.Tensor, k: int, weight: torch.Tensor) -> None:
    _require(x.dtype in (torch.bfloat16, torch.float16), f"x must be bfloat16 or float16, got {x.dtype}")
    _require(x.shape[-1] == k, f"x has K = {x.shape[-1]} but the weight has K = {k}")
    _require(x.device == weight.device, f"x is on {x.device} but the weight is on {weight.device}")


def check_layer_extras(x: torch.Tensor, n: int, k: int, residual: torch.Tensor | None,
                       norm_weight: torch.Tensor | None, norm_eps: float) -> None:
    """Validates a linear's decoder-layer extras: residual x.dtype [..., N] (the output's shape), norm_weight
    x.dtype [K], norm_eps finite and >= 0."""
    if residual is not None:
        want = (*x.shape[:-1], n)
        _require(tuple(residual.shape) == want and residual.dtype == x.dtype,
                 f"residual must be {x.dtype} {want} (the output's shape), got {residual.dtype} "
                 f"{tuple(residual.shape)}")
        _require(residual.device == x.device, f"residual is on {residual.device} but x is on {x.device}")
    if norm_weight is not None:
        _require(norm_weight.dim() == 1 and norm_weight.shape[0] == k and norm_weight.dtype == x.dtype,
                 f"norm_weight must be {x.dtype} [{k}], got {norm_weight.dtype} {tuple(norm_weight.shape)}")
        _require(norm_weight.device == x.device, f"norm_weight is on {norm_weight.device} but x is on {x.device}")
        _require(math.isfinite(norm_eps) and norm_eps >= 0, f"norm_eps must be finite and >= 0, got {norm_eps}")


def check_kv_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                    v_scale: torch.Tensor) -> tuple[int, int, int, int]:
    """Validates an FP8 cache pair (e4m3 [B, Hkv, L, D] each, fp32 scales [B, Hkv, L]); returns (B, Hkv, L, D)."""
    for name, cache, scale in (("k", k_cache, k_scale), ("v", v_cache, v_scale)):
        _require(cache.dtype == torch.float8_e4m3fn, f"{name}_cache must be float8_e4m3fn, got {cache.dtype}")
        _require(cache.dim() == 4, f"{name}_cache must be [B, Hkv, L, D], got shape {tuple(cache.shape)}")
        _require(cache.is_contiguous() and scale.is_contiguous(), f"{name}_cache and {name}_scale must be contiguous")
        _require(scale.dtype == torch.float32 and tuple(scale.shape) == tuple(cache.shape[:3]),
                 f"{name}_scale must be float32 {tuple(cache.shape[:3])}, got {scale.dtype} {tuple(scale.shape)}")
    _require(k_cache.shape == v_cache.shape, "k_cache and v_cache must have one shape")
    return tuple(k_cache.shape)


# ---------------------------------------------------------------------------------------------------
# Wrappers (documented entry points) and fake impls.


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 weight_global_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                 norm_eps: float = 0.0) -> torch.Tensor:
    """y = x' @ dequant(weight).T + bias (+ residual), x' = x, or rms_norm(x, norm_weight, norm_eps) if norm_weight is
    given (reference.rms_norm: Qwen3's RMSNorm).

    x: bf16/fp16 [..., K]; weight: uint8 [N, K/2]; weight_scale: e4m3 [N, K/16];
    weight_global_scale: fp32 []; bias: x.dtype [N] or None; residual: x.dtype [..., N] or None, added to y after y is
    rounded to x.dtype (as a separate add would); norm_weight: x.dtype [K] or None. Returns x.dtype [..., N].
    The residual and the norm are a decoder layer's, fused into the GEMV at one row (CUDA: no extra launch).
    Example: y = nvfp4_linear(torch.randn(2, 64, dtype=torch.bfloat16), w, s, g)  # w [N, 32] -> y [2, N]
    """
    return torch.ops.adallm.nvfp4_linear(x, weight, weight_scale, weight_global_scale, bias, residual, norm_weight,
                                         norm_eps)


@torch.library.register_fake("adallm::nvfp4_linear")
def _(x, weight, weight_scale, weight_global_scale, bias, residual=None, norm_weight=None, norm_eps=0.0):
    n, k = check_nvfp4_weight(weight, weight_scale, weight_global_scale)
    check_activation(x, k, weight)
    if bias is not None:
        _require(bias.shape == (n,) and bias.dtype == x.dtype, f"bias must be {x.dtype} [{n}]")
    check_layer_extras(x, n, k, residual, norm_weight, norm_eps)
    return x.new_empty((*x.shape[:-1], n))


# nvfp4_linear_glu's act: SiLU (Qwen3), GELU with the tanh approximation (Gemma3)
GLU_ACTIVATIONS = ("silu", "gelu_tanh")


def nvfp4_linear_glu(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     weight_global_scale: torch.Tensor, activation: str, norm_weight: torch.Tensor | None = None,
                     norm_eps: float = 0.0) -> torch.Tensor:
    """A gated MLP's first half: y = act(x' @ W[:N/2].T) * (x' @ W[N/2:].T), W = dequant(weight) [N, K] (gate rows, then
    up rows: a fused gate_up NVFP4 weight), act one of GLU_ACTIVATIONS, x' = x or rms_norm(x, norm_weight, norm_eps)
    as in nvfp4_linear. The gate and up sums meet in fp32, unrounded.

    x: bf16/fp16 [..., K]; weight: uint8 [N, K/2] (N even); weight_scale: e4m3 [N, K/16]; weight_global_scale: fp32 [];
    norm_weight: x.dtype [K] or None. Returns x.dtype [..., N/2].
    Example: h = nvfp4_linear_glu(x, w, s, g, "silu")  # w [2I, K/2] -> h [..., I]
    """
    return torch.ops.adallm.nvfp4_linear_glu(x, weight, weight_scale, weight_global_scale, activation, norm_weight,
                                             norm_eps)


def check_glu_args(x, weight, weight_scale, weight_global_scale, activation, norm_weight=None, norm_eps=0.0) -> int:
    """Validates nvfp4_linear_glu's arguments; returns N."""
    n, k = check_nvfp4_weight(weight, weight_scale, weight_global_scale)
    check_activation(x, k, weight)
    _require(activation in GLU_ACTIVATIONS, f"activation must be 'silu' or 'gelu_tanh', got {activation!r}")
    _require(n % 2 == 0, f"N = {n} must be even (gate rows, then as many up rows)")
    check_layer_extras(x, n, k, None, norm_weight, norm_eps)
    return n


@torch.library.register_fake("adallm::nvfp4_linear_glu")
def _(x, weight, weight_scale, weight_global_scale, activation, norm_weight=None, norm_eps=0.0):
    n = check_glu_args(x, weight, weight_scale, weight_global_scale, activation, norm_weight, norm_eps)
    return x.new_empty((*x.shape[:-1], n // 2))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """y = x @ (weight * weight_scale[:, None]).T, the FP8 weight-only linear (W8A16) of an FP8 lm_head.

    x: bf16/fp16 [..., K]; weight: float8_e4m3fn [N, K]; weight_scale: fp32 [N]. Returns x.dtype [..., N].
    Example: y = fp8_linear(torch.randn(1, 64, dtype=torch.bfloat16), w, s)  # w [N, 64], s [N] -> y [1, N]
    """
    return torch.ops.adallm.fp8_linear(x, weight, weight_scale)


@torch.library.register_fake("adallm::fp8_linear")
def _(x, weight, weight_scale):
    n, k = check_fp8_weight(weight, weight_scale)
    check_activation(x, k, weight)
    return x.new_empty((*x.shape[:-1], n))


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes x to NVFP4 with a given per-tensor global scale (ModelOpt recipe, round-to-nearest-even).

    x: bf16/fp16/fp32 [N, K], K % 16 == 0, finite; global_scale: fp32 [].
    Returns (weight uint8 [N, K/2], weight_scale float8_e4m3fn [N, K/16]); see adallm/nvfp4.py for the
    recipe and for computing global_scale.
    """
    return torch.ops.adallm.nvfp4_quantize(x, global_scale)


def check_quantize_args(x: torch.Tensor, global_scale: torch.Tensor) -> None:
    _require(x.dtype in (torch.bfloat16, torch.float16, torch.float32),
             f"x must be bfloat16, float16 or float32, got {x.dtype}")
    _require(x.dim() == 2, f"x must be 2-D [N, K], got shape {tuple(x.shape)}")
    _require(x.shape[1] % NVFP4_BLOCK == 0, f"K = {x.shape[1]} must be a multiple of {NVFP4_BLOCK}")
    _require(global_scale.dtype == torch.float32 and global_scale.dim() == 0,
             f"global_scale must be a float32 scalar tensor, got {global_scale.dtype} {tuple(global_scale.shape)}")
    _require(x.device == global_scale.device, "x and global_scale must be on one device")


@torch.library.register_fake("adallm::nvfp4_quantize")
def _(x, global_scale):
    check_quantize_args(x, global_scale)
    n, k = x.shape
    return (x.new_empty((n, k // 2), dtype=torch.uint8),
            x.new_empty((n, k // NVFP4_BLOCK), dtype=torch.float8_e4m3fn))


def nvfp4_moe_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     weight_global_scale: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Routed NVFP4 experts: out[t, j] = x[t] (or x[t, j]) @ dequant(weight[expert_ids[t, j]]).T.

    x: bf16/fp16 [T, K] (one input shared by the top-k experts, e.g. gate_up) or [T, topk, K] (one per
    expert, e.g. down); weight: uint8 [E, N, K/2]; weight_scale: e4m3 [E, N, K/16];
    weight_global_scale: fp32 [E]; expert_ids: int32/int64 [T, topk], each in [0, E).
    Returns x.dtype [T, topk, N]. Only the routed experts' weights are read. An id outside [0, E) raises
    (CPU; CUDA with many pairs, a prefill) or, where checking would need a host sync (the CUDA GEMV of
    decode steps), makes that row of the output NaN.
    """
    return torch.ops.adallm.nvfp4_moe_linear(x, weight, weight_scale, weight_global_scale, expert_ids)


@torch.library.register_fake("adallm::nvfp4_moe_linear")
def _(x, weight, weight_scale, weight_global_scale, expert_ids):
    n, k = check_nvfp4_weight(weight, weight_scale, weight_global_scale, experts=True)
    check_activation(x, k, weight)
    _require(expert_ids.dtype in (torch.int32, torch.int64) and expert_ids.dim() == 2,
             f"expert_ids must be int32/int64 [T, topk], got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    t, topk = expert_ids.shape
    _require(x.shape in ((t, k), (t, topk, k)),
             f"x must be [{t}, {k}] or [{t}, {topk}, {k}] to match expert_ids, got {tuple(x.shape)}")
    return x.new_empty((t, topk, n))


def moe_router_topk(x: torch.Tensor, weight: torch.Tensor, top_k: int,
                    renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mixture-of-experts router (Qwen3-MoE's): which top_k experts each token goes to, with what weight.

    x: bf16/fp16 [T, H]; weight: x.dtype [E, H]. logits = x @ weight.T (fp32 sums, rounded to x.dtype);
    p = softmax(logits) in fp32; ids = the top_k experts by logit, largest first (equal logits: the lower expert
    first); w = p[ids], divided by its sum when renormalize. Returns (logits x.dtype [T, E], w x.dtype [T, top_k],
    ids int64 [T, top_k]), what transformers' Qwen3MoeTopKRouter returns.
    """
    return torch.ops.adallm.moe_router_topk(x, weight, top_k, renormalize)


def check_router_args(x, weight, top_k) -> None:
    _require(x.dtype in (torch.bfloat16, torch.float16), f"x must be bfloat16 or float16, got {x.dtype}")
    _require(weight.dtype == x.dtype, f"the router weight must be {x.dtype} like x, got {weight.dtype}")
    _require(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
             f"x must be [T, H] and the router weight [E, H], got {tuple(x.shape)} and {tuple(weight.shape)}")
    _require(x.is_contiguous() and weight.is_contiguous(), "x and the router weight must be contiguous")
    _require(1 <= top_k <= weight.shape[0], f"top_k = {top_k} must be in [1, E = {weight.shape[0]}]")
    _require(x.device == weight.device, "all moe_router_topk tensors must be on one device")


@torch.library.register_fake("adallm::moe_router_topk")
def _(x, weight, top_k, renormalize):
    check_router_args(x, weight, top_k)
    t = x.shape[0]
    return x.new_empty((t, weight.shape[0])), x.new_empty((t, top_k)), x.new_empty((t, top_k), dtype=torch.int64)


def fp8_kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 k_scale: torch.Tensor, v_scale: torch.Tensor, positions: torch.Tensor) -> None:
    """Quantizes new K/V to e4m3 with one scale per (token, head) and writes them into the cache, in place.

    k, v: bf16/fp16 [B, Hkv, S, D]; k_cache, v_cache: float8_e4m3fn [B, Hkv, L, D];
    k_scale, v_scale: fp32 [B, Hkv, L]; positions: int64 [S], absolute cache positions (slot = p % L),
    S <= L and distinct slots. scale = amax(|x| over D) / 448 (1 for an all-zero row), stored value =
    e4m3(x / scale): the largest element maps to ±448, so no input can overflow to NaN/Inf.
    """
    torch.ops.adallm.fp8_kv_write(k, v, k_cache, v_cache, k_scale, v_scale, positions)


def check_kv_write_args(k, v, k_cache, v_cache, k_scale, v_scale, positions) -> None:
    b, h, length, d = check_kv_caches(k_cache, v_cache, k_scale, v_scale)
    _require(k.dtype in (torch.bfloat16, torch.float16) and v.dtype == k.dtype,
             f"k and v must both be bfloat16 or float16, got {k.dtype}, {v.dtype}")
    _require(k.dim() == 4 and k.shape == v.shape and (k.shape[0], k.shape[1], k.shape[3]) == (b, h, d),
             f"k/v must be [{b}, {h}, S, {d}] to match the cache, got {tuple(k.shape)}, {tuple(v.shape)}")
    _require(positions.dtype == torch.int64 and positions.shape == (k.shape[2],),
             f"positions must be int64 [{k.shape[2]}], got {positions.dtype} {tuple(positions.shape)}")
    _require(k.shape[2] <= length, f"cannot write {k.shape[2]} tokens into a cache of length {length} "
             "(a ring buffer takes at most its length; pass the last L tokens)")
    _require(len({t.device for t in (k, v, k_cache, v_cache, k_scale, v_scale, positions)}) == 1,
             "all fp8_kv_write tensors must be on one device")


@torch.library.register_fake("adallm::fp8_kv_write")
def _(k, v, k_cache, v_cache, k_scale, v_scale, positions):
    check_kv_write_args(k, v, k_cache, v_cache, k_scale, v_scale, positions)


def qk_norm_rope_kv_write(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          k_scale: torch.Tensor, v_scale: torch.Tensor, position: torch.Tensor, eps: float,
                          weight_offset: float = 0.0) -> torch.Tensor:
    """The decode step's attention prologue: q/k RMSNorm per head, RoPE, K/V into the FP8 cache; returns q.

    qkv: bf16/fp16 [B, (Hq + 2 Hkv) * D], one new token per row (the fused projection's output: Hq q heads,
    then Hkv k heads, then Hkv v heads); q_norm_weight, k_norm_weight: qkv.dtype [D]; cos, sin: qkv.dtype
    [B, D] or [1, D] (rotate-half RoPE); caches and scales as in fp8_kv_write; position: int64 [1], the new
    token's absolute position (slot = position % L). Per q/k head, in fp32, rounded once at the end:
        x = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset)    (Qwen3: offset 0, Gemma3: 1)
        y = x * cos + rotate_half(x) * sin
    k's y and v are written with fp8_kv_write's recipe (k quantized from fp32); returns q's y as qkv.dtype
    [B, Hq, D], contiguous (fp8_decode_attention's q).
    """
    return torch.ops.adallm.qk_norm_rope_kv_write(qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache,
                                                  k_scale, v_scale, position, eps, weight_offset)


def check_qk_norm_rope_args(qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, k_scale, v_scale,
                            position, eps) -> int:
    """Validates qk_norm_rope_kv_write's arguments; returns Hq."""
    b, hkv, _, d = check_kv_caches(k_cache, v_cache, k_scale, v_scale)
    _require(qkv.dtype in (torch.bfloat16, torch.float16), f"qkv must be bfloat16 or float16, got {qkv.dtype}")
    heads = qkv.shape[1] // d if qkv.dim() == 2 else 0
    _require(qkv.dim() == 2 and qkv.shape[0] == b and qkv.shape[1] % d == 0 and hkv > 0 and heads > 2 * hkv
             and (heads - 2 * hkv) % hkv == 0,
             f"qkv must be [{b}, (Hq + 2 * {hkv}) * {d}] with Hq a positive multiple of Hkv to match the cache, "
             f"got {tuple(qkv.shape)}")
    _require(qkv.is_contiguous(), "qkv must be contiguous")
    for name, t in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        _require(t.dtype == qkv.dtype and t.shape == (d,) and t.is_contiguous(),
                 f"{name} must be a contiguous {qkv.dtype} [{d}], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        _require(t.dtype == qkv.dtype and t.dim() == 2 and t.shape[0] in (b, 1) and t.shape[1] == d
                 and t.is_contiguous(),
                 f"{name} must be a contiguous {qkv.dtype} [{b} or 1, {d}], got {t.dtype} {tuple(t.shape)}")
    _require(cos.shape == sin.shape, "cos and sin must have one shape")
    _require(position.dtype == torch.int64 and position.shape == (1,),
             f"position must be int64 [1], got {position.dtype} {tuple(position.shape)}")
    _require(eps >= 0, "eps must be >= 0")
    _require(len({t.device for t in (qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, k_scale,
                                     v_scale, position)}) == 1,
             "all qk_norm_rope_kv_write tensors must be on one device")
    return heads - 2 * hkv


@torch.library.register_fake("adallm::qk_norm_rope_kv_write")
def _(qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, k_scale, v_scale, position, eps,
      weight_offset):
    hq = check_qk_norm_rope_args(qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, k_scale, v_scale,
                                 position, eps)
    return qkv.new_empty((qkv.shape[0], hq, k_cache.shape[3]))


def fp8_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                         v_scale: torch.Tensor, cache_seqlens: torch.Tensor, cache_start: torch.Tensor,
                         sm_scale: float, sliding_window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Attention of one new query token per sequence over an FP8 KV cache (GQA, sliding window, softcap).

    q: bf16/fp16 [B, Hq, D], Hq % Hkv == 0; k_cache, v_cache: float8_e4m3fn [B, Hkv, L, D];
    k_scale, v_scale: fp32 [B, Hkv, L]; cache_seqlens: int32 [B], tokens written so far including the
    new one; cache_start: int32 [B], first valid position (left padding before it).
    Row b attends to positions p in [max(cache_start[b], cache_seqlens[b] - sliding_window), cache_seqlens[b])
    (sliding_window = 0: no window), read from slot p % L; that range must fit in L.
    logits = q·k * sm_scale, then softcap * tanh(logits / softcap) when softcap > 0.
    Returns q.dtype [B, Hq, D].
    """
    return torch.ops.adallm.fp8_decode_attention(q, k_cache, v_cache, k_scale, v_scale, cache_seqlens,
                                                 cache_start, sm_scale, sliding_window, softcap)


def check_decode_attention_args(q, k_cache, v_cache, k_scale, v_scale, cache_seqlens, cache_start,
                                sliding_window, softcap) -> None:
    b, hkv, _, d = check_kv_caches(k_cache, v_cache, k_scale, v_scale)
    _require(q.dtype in (torch.bfloat16, torch.float16), f"q must be bfloat16 or float16, got {q.dtype}")
    _require(q.dim() == 3 and q.shape[0] == b and q.shape[2] == d,
             f"q must be [{b}, Hq, {d}] to match the cache, got {tuple(q.shape)}")
    _require(q.shape[1] % hkv == 0, f"Hq = {q.shape[1]} must be a multiple of Hkv = {hkv}")
    _require(q.is_contiguous(), "q must be contiguous")
    _require(d in (64, 128, 256), f"head_dim must be 64, 128 or 256, got {d}")
    for name, t in (("cache_seqlens", cache_seqlens), ("cache_start", cache_start)):
        _require(t.dtype == torch.int32 and t.shape == (b,), f"{name} must be int32 [{b}], got {t.dtype} {tuple(t.shape)}")
    _require(sliding_window >= 0 and softcap >= 0, "sliding_window and softcap must be >= 0")
    _require(len({t.device for t in (q, k_cache, v_cache, k_scale, v_scale, cache_seqlens, cache_start)}) == 1,
             "all fp8_decode_attention tensors must be on one device")


@torch.library.register_fake("adallm::fp8_decode_attention")
def _(q, k_cache, v_cache, k_scale, v_scale, cache_seqlens, cache_start, sm_scale, sliding_window, softcap):
    check_decode_attention_args(q, k_cache, v_cache, k_scale, v_scale, cache_seqlens, cache_start,
                                sliding_window, softcap)
    return torch.empty_like(q)
