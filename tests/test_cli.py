"""The `adallm` command: quantize, info, generate (tiny checkpoints, CPU)."""
import json
import subprocess
import sys

import pytest
import torch

import ckpt_spec as cs
from adallm import cli
from adallm.checkpoint import from_pretrained


def tiny_tokenizer(chat: bool):
    """A word-level tokenizer over the tiny models' 128-token vocabulary ("w0" ... "w123" + specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(124)} | {"<unk>": 124, "<user>": 125, "<assistant>": 126, "</s>": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}") if chat else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", chat_template=template)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    cs.write_bf16(cs.hf_model("qwen3"), "qwen3", str(d))
    tiny_tokenizer(chat=True).save_pretrained(str(d))
    return d


def test_quantize_then_info(bf16_ckpt, tmp_path, capsys):
    out = tmp_path / "nvfp4"
    cli.main(["quantize", str(bf16_ckpt), str(out), "--device", "cpu", "--max-shard-size", "50KB"])
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    ref = from_pretrained(str(bf16_ckpt), device="cpu", progress=False).state_dict()
    got = from_pretrained(str(out), device="cpu", progress=False).state_dict()
    assert all(torch.equal(ref[k].view(torch.uint8) if ref[k].dtype == torch.float8_e4m3fn else ref[k],
                           got[k].view(torch.uint8) if got[k].dtype == torch.float8_e4m3fn else got[k]) for k in ref)
    capsys.readouterr()
    cli.main(["info", str(out)])
    text = capsys.readouterr().out
    assert "format         modelopt W4A16_NVFP4" in text
    assert "Qwen3ForCausalLM (model_type qwen3, 2 layers)" in text
    assert "nvfp4          14 projections, 0.000 B params" in text and "excluded       lm_head" in text
    cli.main(["info", str(out), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["nvfp4_projections"] == 14 and r["files"] >= 2 and r["unquantized_matrices"] == ["lm_head",
                                                                                               "model.embed_tokens"]


def test_quantize_gptq_writes_what_patch_makes(bf16_ckpt, tmp_path):
    """--method gptq: the checkpoint holds what adallm.patch(method="gptq") makes from the same (seeded)
    self-generated calibration, and differs from the default quantizer's."""
    from transformers import AutoModelForCausalLM

    import adallm
    from adallm.calibration import self_generated_calibration
    out = tmp_path / "gptq"
    cli.main(["quantize", str(bf16_ckpt), str(out), "--device", "cpu", "--method", "gptq", "--calib-seqs", "3",
              "--calib-len", "12", "--calib-bos", "1"])
    model = AutoModelForCausalLM.from_pretrained(str(bf16_ckpt), dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = self_generated_calibration(model, n=3, length=12, bos_token_id=1)
    ref = adallm.patch(model, method="gptq", calibration=ids, progress=False).state_dict()
    got = from_pretrained(str(out), device="cpu", progress=False).state_dict()
    mse = from_pretrained(str(bf16_ckpt), device="cpu", progress=False).state_dict()
    packed = [k for k in ref if k.endswith("weight") and ref[k].dtype == torch.uint8]
    assert len(packed) == 8 and all(torch.equal(ref[k], got[k]) for k in packed)  # 4 fused modules x 2 layers
    assert not all(torch.equal(mse[k], got[k]) for k in packed)


def test_lm_head_flag(bf16_ckpt, tmp_path, capsys, monkeypatch):
    """--lm-head: quantize writes dense (default: as the BF16 source stores it) or nvfp4 and refuses fp8, which a
    checkpoint cannot store; generate loads a checkpoint as stored (default) or with the head it names."""
    import adallm.checkpoint as ckpt
    from adallm.linear import FP8Linear, NVFP4Linear
    p = cli.parser()
    assert p.parse_args(["quantize", "a", "b"]).lm_head is None
    assert p.parse_args(["generate", "m", "hi"]).lm_head is None
    assert p.parse_args(["generate", "m", "hi", "--lm-head", "fp8"]).lm_head == "fp8"
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "m", "hi", "--lm-head", "bf16"])
    assert "invalid choice: 'bf16'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--lm-head fp8 cannot be stored"):
        cli.main(["quantize", str(bf16_ckpt), str(tmp_path / "fp8"), "--device", "cpu", "--lm-head", "fp8"])
    assert not (tmp_path / "fp8").exists()
    cli.main(["quantize", str(bf16_ckpt), str(tmp_path / "nvfp4"), "--device", "cpu", "--lm-head", "nvfp4"])
    cli.main(["quantize", str(bf16_ckpt), str(tmp_path / "dense"), "--device", "cpu"])

    heads = []
    load = ckpt.from_pretrained

    def recording(*args, **kw):  # cmd_generate imports from_pretrained when it runs
        model = load(*args, **kw)
        heads.append(type(model.lm_head))
        return model

    monkeypatch.setattr(ckpt, "from_pretrained", recording)
    for ckpt_dir, flags in (("nvfp4", []), ("dense", []), ("dense", ["--lm-head", "fp8"])):
        cli.main(["generate", str(tmp_path / ckpt_dir), "w1 w2", "--max-new-tokens", "3", "--device", "cpu",
                  "--quiet", *flags])
    assert heads == [NVFP4Linear, torch.nn.Linear, FP8Linear]
    assert all(w.startswith("w") for w in capsys.readouterr().out.split())


def test_prompt_goes_through_chat_template():
    ids = cli.prompt_inputs(tiny_tokenizer(chat=True), "w5 w6").input_ids[0].tolist()
    assert ids == [125, 5, 6, 126]  # <user> w5 w6 <assistant>
    assert cli.prompt_inputs(tiny_tokenizer(chat=True), "w5 w6", chat=False).input_ids[0].tolist() == [5, 6]
    assert cli.prompt_inputs(tiny_tokenizer(chat=False), "w5 w6").input_ids[0].tolist() == [5, 6]


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3"]])
def test_generate_streams_tokens(bf16_ckpt, capsys, sampling):
    cli.main(["generate", str(bf16_ckpt), "w1 w2 w3", "--max-new-tokens", "6", "--device", "cpu", "--quiet",
              *sampling])
    words = capsys.readouterr().out.split()
    assert 1 <= len(words) <= 6 and all(w.startswith("w") for w in words)


def test_help_documents_every_flag():
    import argparse
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, flags in {"quantize": ["--device", "--method", "--lm-head", "--max-shard-size", "--calib-seqs",
                                     "--calib-len", "--calib-bos"],
                        "generate": ["--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--device",
                                     "--system", "--no-chat-template", "--lm-head", "--quiet"],
                        "info": ["--json"]}.items():
        documented = {o for a in sub[name]._actions if a.help for o in a.option_strings}
        assert set(flags) <= documented, name
    text = subprocess.run([sys.executable, "-m", "adallm", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(c in text for c in ("quantize", "generate", "info", "bench"))


def test_info_error_is_clear(tmp_path, capsys):
    with pytest.raises(ValueError, match="no config.json"):
        cli.main(["info", str(tmp_path)])
