"""`generate`'s decode loop for patched models on CUDA: each step one CUDA-graph replay, no host sync per token.

Why: transformers' `_sample` reads "are all rows finished?" on the host after every step (its deferred
check is off on CUDA), so the host's per-step work (preparing inputs, the compiled call's guards, logits
processors) never overlaps the GPU. Measured on Qwen3-8B shapes, NVFP4, batch 1 (H100): 3.4 ms of GPU
kernels per step took 5.45 ms per step that way (128 new tokens), and 3.55 ms with this loop
(benchmarks/results/gpu_runs.md).

This loop (installed by `adallm.patch` as the model's `_sample`, which greedy search and sampling use):
  - prefill: transformers' own `_prefill`, unchanged;
  - decode: the model forward for one token per row, compiled by torch.compile (inductor fuses the norms
    and RoPE around the adallm ops; no CUDA graphs of its own). The first step runs it directly (and
    compiles it on the first call); the second step is captured into a CUDA graph with static token and
    position buffers, and every later step replays that graph. The graph is kept with the cache it was
    captured on, and `generate` reuses its cache across calls of the same shape (kv_cache.py), so later
    calls replay from their first step;
  - logits processors, sampling and stopping criteria run as in transformers (device ops, any processor);
  - the "all rows finished" flag and the streamer's tokens travel to the host through pinned memory and
    are read one step late, so the host queues step t + 1 while the GPU runs step t. When the flag says
    stop, the one step too many is undone: its token is dropped and the cache forgets it.
Positions come from the attention mask as transformers computes them (left padding included); the FP8
cache's attention needs no mask in decode (it reads each row's first valid position from the cache).

It applies when the inputs are on CUDA, the cache is an Fp8KVCache, and the call asks for nothing the loop
does not produce (attentions, hidden states, synced GPUs) or turns compilation off
(`disable_compile=True`); otherwise transformers' loop runs, with the same tokens and slower.
"""
from __future__ import annotations

import types

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .kv_cache import Fp8KVCache, cache_kwarg_name

__all__ = ["use_graph_decode_in_generate"]


class _GraphStep:
    """One (compiled) decode step as a CUDA graph over static buffers: ids/pos int64 [B, 1] -> logits [B, V].
    Capturing does not run the step; each call copies the inputs in and replays."""

    def __init__(self, compiled_step, cache: Fp8KVCache, ids: torch.Tensor, pos: torch.Tensor) -> None:
        self.ids, self.pos = ids.clone(), pos.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = _run_compiled(compiled_step, self.ids, self.pos, cache)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


def _decode_step(model):
    """model on one new token per row: (ids, pos int64 [B, 1], cache) -> last-token logits [B, V]."""
    key = cache_kwarg_name(model)

    def step(ids: torch.Tensor, pos: torch.Tensor, cache: Fp8KVCache) -> torch.Tensor:
        out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **{key: cache})
        return out.logits[:, -1]

    return step


def _compiled_decode_step(model):
    step = _decode_step(model)
    # Dynamo counts recompilations (limit: torch._dynamo.config.recompile_limit, 8) per code object, and
    # every model's `step` shares one: give each model its own, so only its batch sizes count.
    step = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, None, step.__closure__)
    # Inductor's defaults. Its triton.multi_kernel (each reduction compiled looped and persistent, the faster kept) took
    # 0.035 ms off a Qwen3-8B batch-1 step while the residual add + RMSNorm kernels were inductor's, but under torch
    # 2.11 a second process that hits the FX graph cache fails to load the multi-kernel (triton's JITFunction.cache_key
    # on a None lock: "'NoneType' object does not support the context manager protocol"), and at batch 1 those norms
    # now run inside the GEMVs (integrations/qwen3.py) (benchmarks/results/gpu_runs.md, sixteenth session).
    return torch.compile(step, fullgraph=True, dynamic=False)


def _run_compiled(step, *args) -> torch.Tensor:
    """Calls (or captures) the compiled step; a compilation failure becomes an error that says what to do."""
    try:
        return step(*args)
    except torch._dynamo.exc.TorchDynamoException as e:
        raise RuntimeError(
            f"adallm: torch.compile failed on the decode step ({str(e).splitlines()[0]}). "
            "generate(..., disable_compile=True) decodes with transformers' loop and eager steps instead; if the "
            "cause is the recompile limit (one compilation per batch size), raise "
            "torch._dynamo.config.recompile_limit") from e


class _LateFlags:
    """Device -> host copies of (all rows finished, this step's tokens), read one step after they were made."""

    def __init__(self, batch: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.slots = [(torch.zeros((), dtype=torch.bool, pin_memory=cuda),
                       torch.zeros(batch, dtype=torch.long, pin_memory=cuda),
                       torch.cuda.Event() if cuda else None) for _ in range(2)]
        self.step = 0

    def push(self, finished: torch.Tensor, tokens: torch.Tensor) -> None:
        flag, toks, event = self.slots[self.step % 2]
        flag.copy_(finished, non_blocking=True)
        toks.copy_(tokens, non_blocking=True)
        if event is not None:
            event.record()
        self.step += 1

    def _read(self, slot: int) -> tuple[bool, torch.Tensor]:
        flag, toks, event = self.slots[slot]
        if event is not None:
            event.synchronize()
        return bool(flag), toks.clone()

    def previous(self) -> tuple[bool, torch.Tensor] | None:
        """(finished, tokens) of the step before the last push (waits for its copy); None after the first push."""
        return self._read(self.step % 2) if self.step >= 2 else None

    def last(self) -> tuple[bool, torch.Tensor]:
        return self._read((self.step - 1) % 2)


_DEVICES = ("cuda",)  # where the loop runs (tests add "cpu" to check its logic against transformers' loop)


def _applies(model, input_ids, generation_config, synced_gpus, cache) -> bool:
    return (input_ids.device.type in _DEVICES and isinstance(cache, Fp8KVCache) and not synced_gpus
            and not generation_config.disable_compile and not generation_config.output_attentions
            and not generation_config.output_hidden_states and not model.config.is_encoder_decoder)


def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
            streamer=None, **model_kwargs):
    cache = model_kwargs.get(cache_kwarg_name(self))
    if not _applies(self, input_ids, generation_config, synced_gpus, cache):
        return self._adallm_hf_sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                      synced_gpus, streamer, **model_kwargs)
    cfg = generation_config
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    pad = cfg._pad_token_tensor.to(input_ids.device) if cfg._pad_token_tensor is not None else None
    keep_scores = cfg.return_dict_in_generate and cfg.output_scores
    keep_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores, raw_logits = [], []  # lists until the end (transformers returns tuples)
    max_length = stopping_criteria.max_length
    batch = input_ids.shape[0]
    # The replayed steps skip the cache's host-side capacity check: check once for the whole call (the
    # last token is never fed, so max_length - 1 positions are written).
    if max_length is not None and max_length - 1 > cache.capacity:
        raise ValueError(f"adallm: generate needs {max_length - 1} positions but the FP8 KV cache holds "
                         f"{cache.capacity} per sequence")

    if not hasattr(self, "_adallm_decode_step"):
        self._adallm_decode_step = _compiled_decode_step(self)
    mask = model_kwargs.get("attention_mask")
    outputs = self._prefill(input_ids, cfg, model_kwargs)
    logits = outputs.logits[:, -1]
    del outputs
    # Position of the first new token: the valid tokens before it (transformers' rule, left padding included).
    pos = (mask.sum(dim=-1, keepdim=True) if mask is not None
           else torch.full((batch, 1), input_ids.shape[1], device=input_ids.device)).long()
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    flags = _LateFlags(batch, input_ids.device)
    # The graph of an earlier call on the same cache (generate reuses its cache when it fits) replays as is.
    last = getattr(self, "_adallm_graph", None)
    graph = last[1] if last is not None and last[0] is cache and last[1].ids.shape[0] == batch else None
    self._adallm_graph = None  # a new capture must not keep the old one's memory pool alive
    extra_step = False
    while True:
        logits = logits.to(dtype=torch.float32, copy=True)  # never the graph's static output itself
        next_scores = logits_processor(input_ids, logits)
        if keep_scores:
            scores.append(next_scores)
        if keep_logits:
            raw_logits.append(logits)
        if cfg.do_sample:
            next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = next_scores.argmax(dim=-1)
        if has_eos:
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, next_scores)
        flags.push(unfinished.max() == 0, next_tokens)
        late = flags.previous()
        if late is not None:
            finished, tokens = late
            if streamer is not None:
                streamer.put(tokens)
            if finished:  # every row was done one step ago: the step just taken was one too many
                extra_step = True
                break
        if max_length is not None and input_ids.shape[1] >= max_length:
            break
        ids = next_tokens[:, None]
        if graph is None and flags.step == 1:
            logits = _run_compiled(self._adallm_decode_step, ids, pos, cache)  # the model's first call compiles
        else:
            if graph is None:
                graph = _GraphStep(self._adallm_decode_step, cache, ids, pos)
            logits = graph(ids, pos)
        pos = pos + 1
    if extra_step:
        input_ids = input_ids[:, :-1]
        scores, raw_logits = scores[:-1], raw_logits[:-1]
        cache.forget_last_token()
    elif streamer is not None:
        streamer.put(flags.last()[1])
    cache.device_state_changed()
    if graph is not None:
        self._adallm_graph = (cache, graph)
    if streamer is not None:
        streamer.end()
    if not cfg.return_dict_in_generate:
        return input_ids
    cache_field = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
    return GenerateDecoderOnlyOutput(sequences=input_ids, scores=tuple(scores) if keep_scores else None,
                                     logits=tuple(raw_logits) if keep_logits else None,
                                     **{cache_field: cache})


_WITH_GRAPH_DECODE: dict[type, type] = {}


def use_graph_decode_in_generate(model) -> None:
    """Makes `model.generate` decode with the loop above (this instance only).

    `generate` looks its decoding method up on the model's class (`type(self)._sample`), so the instance
    moves to a subclass that differs only in `_sample` and keeps the class's name and module (so
    `save_pretrained` writes the same architecture and isinstance checks hold).
    """
    cls = type(model)
    if cls not in _WITH_GRAPH_DECODE:
        _WITH_GRAPH_DECODE[cls] = type(cls.__name__, (cls,), {
            "_sample": _sample, "_adallm_hf_sample": cls._sample, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    model.__class__ = _WITH_GRAPH_DECODE[cls]
