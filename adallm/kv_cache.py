"""The FP8 (e4m3) KV cache: a transformers `Cache` with static per-layer buffers, written by
`adallm::fp8_kv_write` (prefill) and `adallm::qk_norm_rope_kv_write` (decode) and read by
`adallm::fp8_decode_attention` (AdaLLM's attention module does all three).

Per layer (layout of adallm_ops/ops.py):
    keys, values             float8_e4m3fn [B, Hkv, L, D]   absolute position p lives in slot p % L
    key_scale, value_scale   float32       [B, Hkv, L]      one scale per (token, head): amax / 448
    length                   int64         []               tokens written so far (same for every row)
    start                    int32         [B]              first non-padding position of each row
Full-attention layers have L = max_cache_len (slot = p); sliding-window layers have
L = min(sliding_window, max_cache_len), a ring buffer holding the last L positions, which is all a
window of that size ever reads. Scales are computed from the data at write time: no calibration, and the
largest element of a row maps to ±448, so no input can overflow to NaN/Inf.

Padding: a left-padded row b holds pad tokens at positions [0, start[b]). `start` is taken from the
attention mask of the first chunk written into an empty cache (later chunks are assumed unpadded, which
is how `generate` and chat continuations call the model).

Host state: decode reads only device tensors (`length`, `start`), so a compiled decode step has no host
sync and no Python-int guard that changes every step. The host copy of the length (needed to size
prefill masks) is kept in eager mode and re-read once, with a sync, after compiled decode steps.
"""
from __future__ import annotations

import types

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import adallm_ops  # noqa: F401  (defines torch.ops.adallm)

__all__ = ["Fp8KVCache", "Fp8CacheLayer", "Fp8SlidingWindowCacheLayer", "use_fp8_cache_in_generate"]


def _mark_static(*tensors: torch.Tensor) -> None:
    """Fixed addresses for CUDA graphs (as transformers' StaticLayer does); not allowed while tracing."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class Fp8CacheLayer(CacheLayerMixin):
    """One full-attention layer of Fp8KVCache (L = max_cache_len). Buffers are allocated on the first write."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, max_cache_len: int, **kwargs) -> None:
        super().__init__()
        if max_cache_len <= 0:
            raise ValueError(f"adallm: max_cache_len must be positive, got {max_cache_len}")
        self.max_cache_len = max_cache_len  # L, the slots per sequence
        self.sliding_window = 0  # as fp8_decode_attention takes it: 0 = no window
        self.length = torch.zeros((), dtype=torch.int64)
        self._host_length: int | None = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        dev = key_states.device
        self.device, self.batch_size, self.num_heads, self.head_dim = dev, b, h, d
        shape = (b, h, self.max_cache_len, d)
        self.keys = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=dev)
        self.values = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=dev)
        self.key_scale = torch.ones(shape[:3], dtype=torch.float32, device=dev)
        self.value_scale = torch.ones(shape[:3], dtype=torch.float32, device=dev)
        self.length = self.length.to(dev)
        self.start = torch.zeros(b, dtype=torch.int32, device=dev)
        _mark_static(self.keys, self.values, self.key_scale, self.value_scale, self.length, self.start)
        self.is_initialized = True

    # -- what AdaLLM's attention module calls -----------------------------------------------------------

    def host_length(self) -> int:
        """Tokens written so far, as a Python int (one device sync after compiled decode steps, else none)."""
        if self._host_length is None:
            self._host_length = int(self.length)
        return self._host_length

    def read_prefix(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The cached positions a new chunk can attend to, dequantized: ([B,Hkv,n,D], [B,Hkv,n,D], first position).

        They are [max(0, seen - L), seen): everything for a full layer, the last L for a ring buffer.
        """
        seen = self.host_length()
        lo = max(0, seen - self.max_cache_len)
        slots = torch.arange(lo, seen, device=self.device) % self.max_cache_len
        out = []
        for cache, scale in ((self.keys, self.key_scale), (self.values, self.value_scale)):
            # index_select has no float8 kernel on CUDA: gather the bytes.
            q = cache.view(torch.uint8).index_select(2, slots).view(torch.float8_e4m3fn)
            out.append((q.float() * scale.index_select(2, slots).unsqueeze(-1)).to(dtype))
        return out[0], out[1], lo

    def write_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor,
                    valid: torch.Tensor | None) -> None:
        """Prefill: stores S new tokens [B,Hkv,S,D] at positions [seen, seen+S) (a ring keeps the last L).

        valid: bool [B, S] (False = padding) or None; used only when the cache is empty, to set `start`.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        seen, s = self.host_length(), key_states.shape[2]
        self._check_capacity(seen + s)
        if seen == 0 and valid is not None:
            # Left padding: the first valid token of each row (argmax returns the first maximum).
            self.start.copy_(valid.to(torch.int32).argmax(dim=-1).to(torch.int32))
        n = min(s, self.max_cache_len)
        positions = torch.arange(seen + s - n, seen + s, device=self.device)
        torch.ops.adallm.fp8_kv_write(key_states[:, :, s - n:].contiguous(), value_states[:, :, s - n:].contiguous(),
                                      self.keys, self.values, self.key_scale, self.value_scale, positions)
        self.length.add_(s)
        self._host_length = seen + s

    def next_position(self) -> torch.Tensor:
        """Decode: where the new token of every row goes, int64 [1] on the device (no host sync). The caller
        writes it there (qk_norm_rope_kv_write) and then calls advance()."""
        if torch.compiler.is_compiling():
            self._host_length = None  # the device `length` is the truth now; re-read it when a host needs it
        else:
            self._check_capacity(self.host_length() + 1)
        return self.length.view(1)

    def advance(self) -> torch.Tensor:
        """Decode: counts the token written at next_position(); returns cache_seqlens int32 [B] (tokens
        written, this one included) for fp8_decode_attention."""
        if self._host_length is not None:
            self._host_length += 1
        self.length.add_(1)
        return self.length.to(torch.int32).expand(self.batch_size).contiguous()

    def _check_capacity(self, needed: int) -> None:
        if needed > self.max_cache_len and not self.is_sliding:
            raise ValueError(f"adallm: the FP8 KV cache holds {self.max_cache_len} tokens per sequence; "
                             f"{needed} do not fit (build Fp8KVCache with a larger max_cache_len)")

    # -- the transformers Cache-layer interface ---------------------------------------------------------

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("adallm: Fp8KVCache is written and read by AdaLLM's attention modules; use it with a "
                           "model patched by adallm.patch (an unpatched model needs a transformers cache)")

    def get_seq_length(self) -> torch.Tensor | int:
        # A device tensor, as transformers' StaticLayer returns: position ids derived from it need no sync.
        return self.length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask transformers builds for this layer.

        Prefill: the mask spans absolute positions [0, seen + S) (the attention module slices what it uses).
        Decode: fp8_decode_attention masks from cache_seqlens/cache_start and never reads the mask, so a
        constant size keeps the compiled decode step free of a length that changes every step.
        """
        if query_length == 1:
            return 1, 0
        return self.host_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        # Stale K/V need no zeroing: attention only reads positions below `length`.
        if self.is_initialized:
            self.length.zero_()
            self.start.zero_()
        self._host_length = 0

    def forget_last_token(self) -> None:
        """Undoes the last decode write (generate's one step too many, adallm/generation.py). A ring buffer
        loses nothing the next step needs: the overwritten slot held position p - L, outside the window of
        the token that will be written at p again."""
        if self.is_initialized:
            self.length.sub_(1)
        self._host_length = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError("adallm: Fp8KVCache cannot be cropped (assisted decoding needs a transformers cache)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b takes the state of row beam_idx[b], in place (static addresses are kept)."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        for t in (self.keys.view(torch.uint8), self.values.view(torch.uint8), self.key_scale, self.value_scale,
                  self.start):
            t.copy_(t.index_select(0, idx))


class Fp8SlidingWindowCacheLayer(Fp8CacheLayer):
    """One sliding-window layer: a ring buffer of L = min(sliding_window, max_cache_len) slots."""

    is_sliding = True

    def __init__(self, max_cache_len: int, sliding_window: int, **kwargs) -> None:
        if sliding_window <= 0:
            raise ValueError(f"adallm: sliding_window must be positive, got {sliding_window}")
        super().__init__(min(max_cache_len, sliding_window))
        self.sliding_window = sliding_window


class Fp8KVCache(Cache):
    """FP8 KV cache for a model patched by adallm.patch; one layer per decoder layer, as config.layer_types says.

    config: the model's config (its text config is used); max_cache_len: the longest sequence (prompt plus
    new tokens) a full-attention layer holds. `generate` on a patched model builds one by default; build
    one yourself to keep a conversation's cache across calls:
        cache = adallm.Fp8KVCache(model.config, max_cache_len=4096)
        model.generate(**inputs, past_key_values=cache)   # transformers >= 5.2x names it `cache=`
    """

    def __init__(self, config, max_cache_len: int) -> None:
        text = config.get_text_config(decoder=True)
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        layers = []
        for i, kind in enumerate(layer_types):
            if kind == "full_attention":
                layers.append(Fp8CacheLayer(max_cache_len))
            elif kind == "sliding_attention":
                layers.append(Fp8SlidingWindowCacheLayer(max_cache_len, text.sliding_window))
            else:
                raise ValueError(f"adallm: layer {i} has type {kind!r}; Fp8KVCache supports full_attention and "
                                 "sliding_attention layers")
        super().__init__(layers=layers)
        self.capacity = max_cache_len  # positions per sequence (transformers 5.17's Cache owns `max_cache_len`)

    def forget_last_token(self) -> None:
        """Every layer drops its last decoded token (see Fp8CacheLayer.forget_last_token)."""
        for layer in self.layers:
            layer.forget_last_token()

    def device_state_changed(self) -> None:
        """Decode steps ran without Python (CUDA-graph replays): the host copies of the lengths are stale."""
        for layer in self.layers:
            layer._host_length = None


def cache_kwarg_name(model) -> str:
    """The name transformers uses for the cache argument of this model's forward (renamed in 5.2x)."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def use_fp8_cache_in_generate(model) -> None:
    """Makes `model.generate` build an Fp8KVCache when the call does not choose a cache itself.

    transformers has no registry of cache implementations, so the model's `_prepare_cache_for_generation`
    (same signature in 5.17 and 5.24) is wrapped on this instance. A cache passed by the user, a
    `cache_implementation` (e.g. "static", "dynamic"), `use_cache=False` or assisted decoding (which crops
    caches) all go to transformers unchanged.
    """
    original = model._prepare_cache_for_generation
    key = cache_kwarg_name(model)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if (model_kwargs.get(key) is not None or generation_config.cache_implementation is not None
                or generation_config.use_cache is False or getattr(generation_config, "is_assistant", False)):
            return original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        last = getattr(self, "_adallm_cache", None)  # (batch size, Fp8KVCache) of the last call
        # As transformers does for its static cache: never shrink below an earlier call's length (one shape,
        # so a compiled decode step is reused) and honour `max_cache_len` where the version has it.
        max_cache_length = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0,
                               last[1].capacity if last is not None else 0)
        # Reuse the last call's cache when it fits (as transformers does with its static cache): the same
        # buffers let the decode loop replay the CUDA graph it captured then (adallm/generation.py). A
        # cache returned by the last call is therefore reset by this one.
        if last is not None and last[0] == batch_size and last[1].capacity == max_cache_length:
            last[1].reset()
        else:
            self._adallm_cache = last = (batch_size, Fp8KVCache(self.config, max_cache_length))
        model_kwargs[key] = last[1]

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
