"""The `adallm` command: quantize, generate, info (and bench, implemented in adallm.bench)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import nvfp4
from .patching import LM_HEADS


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def cmd_quantize(a: argparse.Namespace) -> None:
    from .checkpoint import from_pretrained, resolve, save_pretrained
    if a.lm_head == "fp8":
        raise SystemExit("adallm quantize: --lm-head fp8 cannot be stored (the ModelOpt format has no per-row FP8 "
                         "weight-only entry): write the head dense (--lm-head dense, the default) and load it with "
                         "--lm-head fp8 (adallm generate) or adallm.from_pretrained(..., lm_head=\"fp8\")")
    if a.method == "gptq":
        model = _quantize_gptq(a)
    else:
        model = from_pretrained(a.src, device=a.device, lm_head=a.lm_head, method=a.method)
    save_pretrained(model, a.dst, tokenizer=_tokenizer(resolve(a.src), required=False),
                    max_shard_size=a.max_shard_size)
    print(f"adallm: wrote {a.dst}", file=sys.stderr)


def _quantize_gptq(a: argparse.Namespace):
    """gptq holds the whole BF16 model: it samples its own calibration text, then quantizes layer by layer."""
    from transformers import AutoModelForCausalLM

    from .calibration import self_generated_calibration
    from .checkpoint import _default_device, detect_quantization, read_config, resolve
    from .patching import patch
    path = resolve(a.src)
    if detect_quantization(read_config(path)[1], path) is not None:
        raise SystemExit(f"adallm: {a.src} is already quantized; --method gptq needs a BF16 checkpoint")
    # Through host memory, then to the device: device_map would need accelerate, which adallm does not.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(_default_device(a.device))
    print(f"adallm: sampling {a.calib_seqs} x {a.calib_len} calibration tokens", file=sys.stderr)
    ids = self_generated_calibration(model, n=a.calib_seqs, length=a.calib_len, bos_token_id=a.calib_bos)
    return patch(model, method="gptq", calibration=ids, lm_head=a.lm_head or "dense")


def _tokenizer(path: str, required: bool = True):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise SystemExit(f"adallm: no usable tokenizer in {path}: {e}") from e
        return None


def prompt_inputs(tok, prompt: str, system: str | None = None, chat: bool = True):
    """Tokenized prompt: through the tokenizer's chat template (user turn, generation prompt) when it has
    one and chat is True, else the raw text."""
    if chat and tok.chat_template:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tok(text, return_tensors="pt", add_special_tokens=False)
    return tok(prompt, return_tensors="pt")


def cmd_generate(a: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from .checkpoint import from_pretrained, resolve
    if a.seed is not None:
        torch.manual_seed(a.seed)
    tok = _tokenizer(resolve(a.model))
    model = from_pretrained(a.model, device=a.device, lm_head=a.lm_head, progress=not a.quiet)
    device = next(model.parameters()).device
    inputs = prompt_inputs(tok, a.prompt, a.system, chat=not a.no_chat_template)
    sample = a.temperature > 0
    kw = dict(do_sample=True, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k) if sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    model.generate(**inputs.to(device), max_new_tokens=a.max_new_tokens, streamer=TextStreamer(
        tok, skip_prompt=True, skip_special_tokens=True), pad_token_id=tok.pad_token_id or tok.eos_token_id, **kw)


def cmd_info(a: argparse.Namespace) -> None:
    from .checkpoint import info
    r = info(a.ckpt)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"path           {r['path']}")
    print(f"architecture   {', '.join(r['architectures'] or [])} (model_type {r['model_type']}, {r['layers']} layers"
          + (f", {r['experts']} experts" if r["experts"] else "") + ")")
    algo = f" {r['quant_algo']}" if r["quant_algo"] else ""
    kv = f", KV cache {r['kv_cache_quant_algo']} ({r['kv_scales']} scales)" if r["kv_cache_quant_algo"] else ""
    print(f"format         {r['format']}{algo}{kv}")
    print(f"files          {r['files']} safetensors, {r['tensors']} tensors, {_gib(r['bytes_total'])}")
    if r["nvfp4_projections"]:
        print(f"nvfp4          {r['nvfp4_projections']} projections, {r['nvfp4_params'] / 1e9:.3f} B params, "
              f"{_gib(r['bytes_nvfp4'])} (as BF16: {_gib(r['bytes_nvfp4_as_bf16'])})")
    print(f"unquantized    {_gib(r['bytes_unquantized'])}; {len(r['unquantized_matrices'])} matrices"
          + (": " + ", ".join(r["unquantized_matrices"][:8]) + (" ..." if len(r["unquantized_matrices"]) > 8 else "")
             if r["unquantized_matrices"] else ""))
    if r["excluded_by_config"]:
        print(f"excluded       {', '.join(r['excluded_by_config'])}")


def cmd_bench(a: argparse.Namespace, rest: list[str]) -> None:
    from . import bench
    bench.main(rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adallm", description="NVFP4 weights and an FP8 KV cache for transformers "
                                "models (Qwen3, Qwen3-MoE, Gemma3) on GPUs without FP4 tensor cores.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="write an NVFP4 (ModelOpt-format) checkpoint of a BF16 or NVFP4 one",
                       description="Load SRC (BF16: quantized layer by layer; NVFP4 ModelOpt or compressed-tensors: "
                       "loaded packed) and save it to DST in the ModelOpt NVFP4 layout, tokenizer included.")
    q.add_argument("src", help="source checkpoint: local directory or Hugging Face Hub id")
    q.add_argument("dst", help="output directory")
    q.add_argument("--device", help="where to quantize (default: cuda if available, else cpu)")
    q.add_argument("--method", default=nvfp4.DEFAULT_METHOD, choices=nvfp4.METHODS,
                   help=f"NVFP4 quantizer, all the same format: rtn (ModelOpt's round-to-nearest), mse (per-block "
                        f"scale search), gptq (error compensation on text the model samples itself; loads the "
                        f"whole BF16 model; the most accurate); default {nvfp4.DEFAULT_METHOD}")
    q.add_argument("--calib-seqs", type=int, default=32, help="gptq: calibration sequences (default 32)")
    q.add_argument("--calib-len", type=int, default=256, help="gptq: tokens per calibration sequence (default 256)")
    q.add_argument("--calib-bos", type=int, help="gptq: token id the calibration text starts from (default: the "
                   "model's BOS)")
    q.add_argument("--lm-head", choices=LM_HEADS, help="lm_head in DST: dense (the model's dtype) or nvfp4 "
                   "(quantized with --method; smaller and faster, less accurate); default: as SRC stores it, i.e. "
                   "dense for a BF16 checkpoint. fp8 cannot be stored: write dense, then `adallm generate "
                   "--lm-head fp8` (or adallm.from_pretrained(..., lm_head=\"fp8\")) quantizes it on load")
    q.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    q.set_defaults(fn=cmd_quantize)

    g = sub.add_parser("generate", help="generate text, streaming tokens as they come",
                       description="Load MODEL (NVFP4 loaded packed; BF16 quantized on load) and continue PROMPT. "
                       "The prompt goes through the tokenizer's chat template when it has one.")
    g.add_argument("model", help="checkpoint: local directory or Hugging Face Hub id")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    g.add_argument("--top-k", type=int, default=50, help="top-k cutoff when sampling (default 50)")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--device", help="device (default: cuda if available, else cpu)")
    g.add_argument("--system", help="system message for the chat template")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    g.add_argument("--lm-head", choices=LM_HEADS, help="lm_head as: dense, fp8 (e4m3 with a scale per row, "
                   "quantized on load: half a BF16 head's bytes, little accuracy lost) or nvfp4 (quantized on load "
                   "if stored dense); default: as MODEL stores it (an NVFP4 head only loads as nvfp4)")
    g.add_argument("--quiet", action="store_true", help="no loading progress bar")
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("info", help="describe a checkpoint: format, layers, sizes, what is excluded",
                       description="Reads only configs and safetensors headers.")
    i.add_argument("ckpt", help="checkpoint: local directory or Hugging Face Hub id")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(fn=cmd_info)

    b = sub.add_parser("bench", help="benchmark against transformers BF16 (see `adallm bench --help`)",
                       add_help=False)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(), argv[1:])
    a = parser().parse_args(argv)
    a.fn(a)
