"""After `import adallm`, transformers' own from_pretrained loads ModelOpt NVFP4 checkpoints packed."""
import pytest
import torch

import adallm  # noqa: F401  (registers quant_method "modelopt")
import ckpt_spec as cs
from adallm.attention import NVFP4Attention
from adallm.checkpoint import from_pretrained


def as_bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_automodel_loads_modelopt_packed(family, tmp_path):
    from transformers import AutoModelForCausalLM
    cs.write_nvfp4(cs.hf_model(family), family, str(tmp_path), "modelopt", kv_scales=True)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ours = from_pretrained(str(tmp_path), device="cpu", progress=False)
    assert any(isinstance(m, NVFP4Attention) for m in hf.modules())
    sa, sb = hf.state_dict(), ours.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:  # the same bytes as adallm.from_pretrained, BF16 tensors included
        assert sa[k].dtype == sb[k].dtype and torch.equal(as_bits(sa[k]), as_bits(sb[k])), k
    assert hf.hf_quantizer.is_compileable
    ids = torch.randint(0, 120, (1, 7))
    with torch.no_grad():
        assert torch.equal(hf(ids, use_cache=False).logits, ours(ids, use_cache=False).logits)


def test_automodel_rejects_unsupported_modelopt_algo(tmp_path):
    import json

    from transformers import AutoModelForCausalLM
    cs.write_nvfp4(cs.hf_model("qwen3"), "qwen3", str(tmp_path), "modelopt")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["quantization"]["quant_algo"] = "FP8"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported quantization: ModelOpt quant_algo 'FP8'"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))
