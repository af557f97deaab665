"""Child process of test_integration_cuda.py::test_generate_again_with_a_warm_compile_cache: a tiny patched Qwen3
generates at batch 1 and 2 on CUDA and prints its tokens. The test runs it twice with one inductor cache directory, so
the second process loads the compiled decode step from inductor's caches."""
import torch
from integration_common import generate, left_pad, tiny_model

import adallm

if __name__ == "__main__":
    torch.manual_seed(0)
    model = tiny_model("qwen3", device="cuda")
    adallm.patch(model, progress=False)
    for rows in ((11,), (20, 13)):
        ids, mask = left_pad([torch.randint(1, model.config.vocab_size, (n,)) for n in rows])
        tokens, _ = generate(model, ids, mask, new=8)
        print("tokens", tokens.tolist(), flush=True)
