"""End-to-end decode/prefill benchmark: transformers BF16 (static cache + compile) vs AdaLLM, one process.

`adallm bench qwen3-8b` (or a model id/path) builds the model, measures the BF16 baseline where it fits,
patches it in place to NVFP4 (+ FP8 KV cache) and measures again on the same prompts. Decode time is
generate(P + n tokens) minus generate(P + 1 token), so it excludes prefill; each number is the median
of `repeats` runs after a warm-up run that also compiles. The weight-bandwidth floor is the bytes one
decode step must read (every layer weight once; for MoE only the routed experts) over the copy
bandwidth measured in the same process. `--lm-head dense,fp8,nvfp4` (any of them, comma-separated; default
dense: lm_head stays BF16) measures AdaLLM once per lm_head kind, each on a fresh copy of the model patched with
adallm.patch(lm_head=...), against the one BF16 baseline of the process: rows "adallm", "adallm+fp8_head",
"adallm+nvfp4_head"; the JSON records "lm_heads" and keys decode_speedup, peak_memory_ratio_b1 and prefill_ratio by row
(results written before it record one "lm_head", or "quantize_lm_head" and a row "adallm+lm_head" for the NVFP4 head,
with the ratios of that one row). The floor counts lm_head at its own size: BF16 2 bytes per weight, FP8 1 byte per
weight + 4 per row, NVFP4 packed codes + block scales + global scale.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import time

import torch
from torch import nn

from .patching import LM_HEADS, check_lm_head

# Published configs (random weights are fine for speed: only shapes matter).
SHAPES: dict[str, dict] = {
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
                          rope_theta=1e6, tie_word_embeddings=False),
    "gemma3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360,
                       num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256,
                       rope_theta=1e6, max_position_embeddings=131072),
    "gemma3-27b": dict(model_type="gemma3_text", hidden_size=5376, intermediate_size=21504,
                       num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                       vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=168,
                       rope_theta=1e6, max_position_embeddings=131072),
}


def build_model(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A named shape set with random weights, or a model id/path loaded with from_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in SHAPES:
        cfg = dict(SHAPES[name])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device)
    model.eval()
    model.generation_config.eos_token_id = None  # always generate exactly the tokens asked for
    model.generation_config.pad_token_id = 0
    return model


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """The measured memory-bandwidth ceiling in bytes/s (bytes read + written): the better of a
    device-to-device memcpy and an SM copy kernel (neg) over `nbytes`, each the median of 10 after 2."""
    a = torch.randn(nbytes // 8, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for copy in (lambda: b.copy_(a), lambda: torch.neg(a, out=b)):
        times = []
        for _ in range(12):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            copy()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        best = min(best, statistics.median(times[2:]))
    return 2 * a.numel() * a.element_size() / best


def git_commit(repo: str = os.path.dirname(__file__)) -> str:
    """The commit measured: $GIT_COMMIT (set where the tree was copied without its .git), else git's, with
    "-dirty" appended when tracked files differ from it (uncommitted edits, or a tree copied over an older .git:
    the label must not name a commit whose code did not run)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, cwd=repo).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def decode_bytes_per_token(model: nn.Module) -> int:
    """Bytes one batch-1 decode step reads from the weights: all parameters and buffers of the decoder
    layers and the lm_head, one embedding row, and for MoE only top-k of E experts. Sizes are those of the
    tensors as they are: a quantized lm_head (patch(lm_head="fp8" / "nvfp4")) counts its codes and scales,
    a BF16 one (tied to the embedding or not) its BF16 matrix, once."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    cfg = model.config.get_text_config()
    total = 0
    for name, t in list(inner.named_parameters()) + list(inner.named_buffers()):
        if "embed_tokens" in name or "rotary" in name:
            continue
        nbytes = t.numel() * t.element_size()
        if ".experts." in name:
            nbytes = nbytes * cfg.num_experts_per_tok // cfg.num_experts
        total += nbytes
    head = model.get_output_embeddings()
    total += sum(t.numel() * t.element_size() for t in list(head.parameters()) + list(head.buffers()))
    return total + cfg.hidden_size * 2


def kv_cache_bytes(config, context: int) -> dict:
    """Bytes of the FP8 KV cache for one sequence of `context` tokens, as Fp8KVCache allocates them (its
    buffers built on the meta device), against a BF16 cache holding `context` tokens in every layer.
    Sliding-window layers hold min(window, context) tokens, so their share stays fixed as context grows."""
    from .kv_cache import Fp8KVCache
    text = config.get_text_config(decoder=True)
    cache = Fp8KVCache(config, context)
    kv = torch.empty(1, text.num_key_value_heads, 1, text.head_dim, device="meta")
    fp8 = 0
    for layer in cache.layers:
        layer.lazy_initialization(kv, kv)
        fp8 += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values, layer.key_scale,
                                                            layer.value_scale))
    bf16 = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2 * context
    return dict(context=context, fp8_bytes=fp8, bf16_full_bytes=bf16, fp8_bytes_per_token=fp8 / context,
                bf16_bytes_per_token=bf16 / context, ratio=fp8 / bf16)


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _generate(model: nn.Module, batch: int, prompt_len: int, **generate_kwargs):
    """A random prompt and a greedy generate(n) closure over it."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(100, vocab - 100, (batch, prompt_len), device=model.device)
    mask = torch.ones_like(ids)

    def gen(n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, **generate_kwargs)

    return gen


def measure(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
            **generate_kwargs) -> dict:
    """Times generate: time to first token and decode tok/s (per sequence) at one batch size."""
    gen = _generate(model, batch, prompt_len, **generate_kwargs)
    gen(new_tokens)  # warm-up (compiles)
    gen(1)
    torch.cuda.reset_peak_memory_stats()
    ttft = _timed(lambda: gen(1), repeats)
    total = _timed(lambda: gen(new_tokens), repeats)
    decode_s = (total - ttft) / (new_tokens - 1)
    return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, ttft_ms=ttft * 1e3,
                decode_ms_per_step=decode_s * 1e3, decode_tok_s=batch / decode_s,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def measure_prefill(model: nn.Module, prompt_len: int, repeats: int = 3, **generate_kwargs) -> float:
    """Prefill tok/s at batch 1: generate of one token (no decode step, so nothing to compile)."""
    gen = _generate(model, 1, prompt_len, **generate_kwargs)
    gen(1)
    return prompt_len / _timed(lambda: gen(1), repeats)


def adallm_label(lm_head: str) -> str:
    """The AdaLLM row's name in the results: "adallm" (lm_head dense), else "adallm+fp8_head" / "adallm+nvfp4_head"."""
    return "adallm" if lm_head == "dense" else f"adallm+{lm_head}_head"


# The table header's name of each lm_head kind (LM_HEADS; bench models are BF16).
HEAD_NAMES = {"dense": "BF16", "fp8": "FP8", "nvfp4": "NVFP4"}


def check_lm_heads(lm_heads: tuple[str, ...]) -> None:
    """ValueError unless lm_heads names kinds of LM_HEADS, each once."""
    for head in lm_heads:
        check_lm_head(head)
    if not lm_heads or len(set(lm_heads)) != len(lm_heads):
        raise ValueError(f"adallm: lm_heads must name each kind once, got {lm_heads}")


def run(name: str, batches=(1, 4, 16), prompt_len: int = 128, new_tokens: int = 128, prefill_len: int = 2048,
        baseline: bool = True, repeats: int = 3, context: int | None = None,
        lm_heads: tuple[str, ...] = ("dense",)) -> dict:
    """context: size every KV cache for this many tokens per sequence (generate's max_cache_len), so the
    peak memory shows what a long conversation needs; default: just the prompt and the new tokens.
    lm_heads: one AdaLLM row per kind, each patched with adallm.patch(lm_head=...) (row adallm_label(kind)); the
    model is built again for every kind after the first (random shape sets: new random weights)."""
    import adallm

    check_lm_heads(lm_heads)  # before the baseline's minutes

    bw = copy_bandwidth()
    import transformers

    results: dict = dict(model=name, gpu=torch.cuda.get_device_name(), copy_bandwidth_GBs=bw / 1e9,
                         torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
                         commit=git_commit(), context=context, lm_heads=list(lm_heads))
    sized = {} if context is None else dict(max_cache_len=context)
    model = build_model(name)
    contexts = sorted({context or prompt_len + new_tokens, 8192, 32768})
    results["kv_cache_per_sequence"] = [kv_cache_bytes(model.config, c) for c in contexts]
    rows = {}
    if baseline:
        rows["bf16"] = _measure_all(model, batches, prompt_len, new_tokens, prefill_len, repeats, bw,
                                    cache_implementation="static", **sized)
    for i, head in enumerate(lm_heads):
        # Drop the last model's compiled graphs (and their CUDA-graph memory pools) before patching, so each
        # row's peak memory is its own; the patched model compiles afresh.
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
        if i > 0:
            del model
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        if i > 0:
            model = build_model(name)
        adallm.patch(model, lm_head=head)
        torch.cuda.empty_cache()
        rows[adallm_label(head)] = _measure_all(model, batches, prompt_len, new_tokens, prefill_len, repeats, bw,
                                                **sized)
    results["rows"] = rows
    if baseline:
        b1 = {r["batch"]: r for r in rows["bf16"]["decode"]}
        labels = [adallm_label(h) for h in lm_heads]
        results["decode_speedup"] = {label: {r["batch"]: r["decode_tok_s"] / b1[r["batch"]]["decode_tok_s"]
                                             for r in rows[label]["decode"]} for label in labels}
        results["peak_memory_ratio_b1"] = {label: rows[label]["decode"][0]["peak_gib"] / b1[batches[0]]["peak_gib"]
                                           for label in labels}
        results["prefill_ratio"] = {label: rows[label]["prefill_tok_s"] / rows["bf16"]["prefill_tok_s"]
                                    for label in labels}
    return results


def _measure_all(model, batches, prompt_len, new_tokens, prefill_len, repeats, bw, **kw) -> dict:
    floor_s = decode_bytes_per_token(model) / bw
    decode = []
    for b in batches:
        r = measure(model, b, prompt_len, new_tokens, repeats, **kw)
        r["floor_ms"] = floor_s * 1e3
        r["pct_of_floor"] = 100 * floor_s / (r["decode_ms_per_step"] / 1e3)
        print(json.dumps(r), flush=True)  # as measured: a run cut short still shows what it finished
        decode.append(r)
        torch.cuda.empty_cache()
    prefill = measure_prefill(model, prefill_len, repeats, **kw)
    print(json.dumps(dict(prefill_len=prefill_len, prefill_tok_s=prefill)), flush=True)
    return dict(weight_bytes_per_token=decode_bytes_per_token(model), decode=decode, prefill_tok_s=prefill,
                prefill_ttft_ms=prefill_len / prefill * 1e3)


def print_table(res: dict) -> None:
    heads = ", ".join(f"{adallm_label(h)}: {HEAD_NAMES[h]}" for h in res["lm_heads"])
    print(f"\n{res['model']} on {res['gpu']} (copy bandwidth {res['copy_bandwidth_GBs']:.0f} GB/s; lm_head {heads})")
    print(f"{'impl':17} {'batch':>5} {'ttft ms':>9} {'ms/step':>8} {'tok/s':>9} {'% floor':>8} {'peak GiB':>9}")
    for impl, rows in res["rows"].items():
        for r in rows["decode"]:
            print(f"{impl:17} {r['batch']:5d} {r['ttft_ms']:9.1f} {r['decode_ms_per_step']:8.2f} "
                  f"{r['decode_tok_s']:9.1f} {r['pct_of_floor']:7.1f}% {r['peak_gib']:9.2f}")
        print(f"{impl:17} weight floor {rows['weight_bytes_per_token'] / 2**30:.3f} GiB/token; "
              f"prefill {rows['prefill_tok_s']:.0f} tok/s (ttft {rows['prefill_ttft_ms']:.0f} ms)")
    for kv in res["kv_cache_per_sequence"]:
        print(f"KV cache, one sequence of {kv['context']} tokens: FP8 {kv['fp8_bytes'] / 2**20:.1f} MiB "
              f"({kv['fp8_bytes_per_token'] / 1024:.1f} KiB/token) vs BF16 full "
              f"{kv['bf16_full_bytes'] / 2**20:.1f} MiB ({kv['bf16_bytes_per_token'] / 1024:.1f} KiB/token): "
              f"{kv['ratio']:.3f}x")
    for key in ("decode_speedup", "peak_memory_ratio_b1", "prefill_ratio"):
        if key in res:
            print(f"{key}: {res[key]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="adallm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"a model id/path or a shape set: {', '.join(SHAPES)}")
    p.add_argument("--batches", default="1,4,16", help="decode batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--no-baseline", action="store_true", help="skip transformers BF16 (e.g. it does not fit)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--context", type=int, help="size the KV caches for this many tokens per sequence (peak memory "
                   "of a long context); default: prompt + new tokens")
    p.add_argument("--lm-head", default="dense", metavar="KINDS",
                   help=f"comma-separated lm_head kinds ({', '.join(LM_HEADS)}; default dense: BF16), one AdaLLM row "
                   "each, patched with adallm.patch(lm_head=...) on a fresh model, against the one BF16 baseline: "
                   "rows adallm, adallm+fp8_head, adallm+nvfp4_head; the floor counts lm_head at its size")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    lm_heads = tuple(h.strip() for h in a.lm_head.split(","))
    check_lm_heads(lm_heads)
    if not torch.cuda.is_available():
        raise SystemExit("adallm bench needs a CUDA GPU")
    res = run(a.model, tuple(int(b) for b in a.batches.split(",")), a.prompt_len, a.new_tokens, a.prefill_len,
              not a.no_baseline, a.repeats, a.context, lm_heads)
    print_table(res)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
