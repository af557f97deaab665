"""Calibration for the "gptq" quantizer: self-generated calibration text and sequential, layer-by-layer
hessians (what `adallm.patch(model, method="gptq", calibration=ids)` runs).

GPTQ minimizes each linear's output error on its calibration inputs, so it needs, per fused group (q/k/v,
o, gate/up, down; per routed expert in MoE layers), the hessian H = sum over the group's inputs x of
x x^T (fp32 [K, K]). `quantize_layers` computes them one decoder layer at a time, as GPTQ is meant to run:

    x = the calibration hidden states entering layer 0                 [n, L, hidden]
    for each layer:
        run the layer (still dense) on x, with hooks summing x x^T at each group's input
        quantize_layer(layer, hessians)          (the caller: swap in NVFP4 modules, or fake-quantize)
        x = the now-quantized layer run on x     (later layers see the quantized earlier ones)

Peak memory: the model, the calibration activations (a few [n, L, hidden] tensors and one layer's
intermediates), and one layer's hessians; never all layers' hessians at once.

Hessian keys (module paths inside a decoder layer, the first linear of each fused group):
    "self_attn.q_proj" (q/k/v share it), "self_attn.o_proj", "mlp.gate_proj" (gate/up share it),
    "mlp.down_proj"; MoE layers instead "mlp.experts.gate_up_proj" [E, H, H] and "mlp.experts.down_proj"
    [E, I, I]: per expert, from the tokens the router sends to it (an expert no token reached gets a zero
    hessian, which the gptq quantizer turns into plain "mse" quantization of that expert). Their memory,
    E * (H^2 + I^2) fp32 per MoE layer, is the largest part of the peak on MoE models: Qwen3-30B-A3B
    (E 128, H 2048, I 768) 2.4 GB.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["self_generated_calibration", "quantize_layers", "check_calibration", "HESSIAN_INPUTS"]

# Where each fused group's input is read: (owner attribute of the decoder layer, linear attribute).
HESSIAN_INPUTS = (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj"))


def self_generated_calibration(model: nn.Module, n: int = 32, length: int = 256, *, seed: int = 0,
                               bos_token_id: int | None = None) -> torch.Tensor:
    """[n, length] token ids the (unquantized) model samples itself from BOS: temperature 1, no top-k/top-p,
    seeded, no early EOS. No data set to ship, and nothing shared with an evaluation text.

    Call it before patching (it runs the model's own generate). The caller's RNG state is left untouched.
    """
    bos = bos_token_id if bos_token_id is not None else model.generation_config.bos_token_id
    if bos is None:
        bos = model.config.bos_token_id
    if bos is None:
        raise ValueError("adallm: the model has no bos_token_id; pass bos_token_id= to self_generated_calibration")
    if n < 1 or length < 2:
        raise ValueError(f"adallm: calibration needs n >= 1 sequences of length >= 2, got n={n}, length={length}")
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        return model.generate(input_ids=torch.full((n, 1), bos, device=dev), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                              cache_implementation="dynamic").cpu()


def check_calibration(ids, vocab_size: int) -> torch.Tensor:
    """Validates calibration token ids: an integer tensor [n, L] with ids in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"adallm: calibration must be a LongTensor of token ids [n, L], got {got} "
                         "(adallm.calibration.self_generated_calibration(model) makes one)")
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"adallm: calibration ids must be non-empty and in [0, {vocab_size}) (the vocabulary)")
    return ids.long()


@torch.no_grad()
def quantize_layers(text_model: nn.Module, ids: torch.Tensor,
                    quantize_layer: Callable[[nn.Module, dict[str, torch.Tensor]], None],
                    progress: bool = False) -> torch.Tensor:
    """Runs `quantize_layer(layer, hessians)` on each decoder layer of `text_model` in order, with hessians
    (keys: this module's docstring) of that layer's inputs on the calibration ids [n, L], computed with the
    earlier layers already quantized. quantize_layer changes the layer in place.

    Returns the hessian fp32 [hidden, hidden] of the final norm's output (the lm_head's input).
    """
    from tqdm.auto import tqdm

    dev = next(text_model.parameters()).device
    x, calls = _layer_inputs(text_model, ids.to(dev))
    for layer, (args, kwargs) in tqdm(list(zip(text_model.layers, calls)), desc="adallm: NVFP4 gptq",
                                      unit="layer", disable=not progress):
        hessians: dict[str, torch.Tensor] = {}
        hooks = _hessian_hooks(layer, hessians)
        try:
            layer(x, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        quantize_layer(layer, hessians)
        del hessians  # freed before the next forward: one layer's hessians at a time
        x = _hidden(layer(x, *args, **kwargs))
    out = text_model.norm(x).reshape(-1, x.shape[-1]).float()
    return out.T @ out


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers 5.x layers return a tensor; older a tuple


def _layer_inputs(text_model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """(hidden states entering layer 0 [n, L, hidden], [(args, kwargs) of each layer's call]).

    The model's own forward builds the per-layer arguments (masks and rotary embeddings differ by layer
    type: Gemma3's sliding vs global layers), so it is run once with every layer replaced by a pass-through
    that records its call: the embeddings, masks and rotary tables are computed, no layer is.
    """
    calls, first = [], []
    saved = [layer.__dict__.get("forward") for layer in text_model.layers]  # accelerate may have set one

    def record(hidden_states, *args, **kwargs):
        if not first:
            first.append(hidden_states)
        calls.append((args, kwargs))
        return hidden_states

    try:
        for layer in text_model.layers:
            layer.forward = record  # an instance attribute: nn.Module.__call__ runs it instead of the class's
        text_model(input_ids=ids, use_cache=False)
    finally:
        for layer, fwd in zip(text_model.layers, saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd
    if len(calls) != len(text_model.layers):
        raise RuntimeError(f"adallm: the model called {len(calls)} of its {len(text_model.layers)} decoder layers "
                           "during calibration")
    return first[0], calls


def _hessian_hooks(layer: nn.Module, hessians: dict[str, torch.Tensor]) -> list:
    """Forward pre-hooks summing x x^T (fp32) into hessians[key] at each group's input of `layer`."""

    def dense(key):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[key] = hessians.get(key, 0) + x.T @ x
        return hook

    hooks = []
    for owner, name in HESSIAN_INPUTS:
        mod = getattr(getattr(layer, owner), name, None)
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(dense(f"{owner}.{name}")))
    experts = getattr(layer.mlp, "experts", None)
    if experts is not None:
        hooks.append(experts.register_forward_pre_hook(_expert_hook(hessians), with_kwargs=True))
    return hooks


def _expert_hook(hessians: dict[str, torch.Tensor]):
    """Pre-hook on transformers' fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn), called
    as experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]): per expert, the hessian of
    the tokens routed to it at gate/up's input, and at down's input act(gate) * up of the same tokens
    (recomputed here from the dense weights, as the experts compute it). Unweighted by the routing weight,
    as usual for GPTQ on MoE."""

    def hook(module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        x, idx = vals["hidden_states"], vals["top_k_index"]
        e, two_i, h = module.gate_up_proj.shape
        gu = hessians.setdefault("mlp.experts.gate_up_proj", torch.zeros(e, h, h, device=x.device))
        dn = hessians.setdefault("mlp.experts.down_proj", torch.zeros(e, two_i // 2, two_i // 2, device=x.device))
        for j in idx.unique().tolist():
            if not 0 <= j < e:
                continue
            xe = x[(idx == j).any(dim=-1)]
            gate, up = nn.functional.linear(xe, module.gate_up_proj[j]).chunk(2, dim=-1)
            xf, he = xe.float(), (module.act_fn(gate) * up).float()
            gu[j] += xf.T @ xf
            dn[j] += he.T @ he

    return hook
