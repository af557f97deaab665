"""Loading NVFP4 checkpoints (ModelOpt, compressed-tensors) packed, quantize-on-load, save_pretrained round trips,
the lm_head kinds against what a checkpoint stores.

Checkpoints are written by tests/ckpt_spec.py from the format specs; the reference is the same transformers
model in float32 with each quantized weight replaced by its float64 dequantization.
"""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open

import adallm
import ckpt_spec as cs
from adallm.checkpoint import CheckpointError, SeparateParts, from_pretrained, info, save_pretrained
from adallm.linear import FP8Linear, NVFP4Linear

FAMILIES = ["qwen3", "qwen3_moe", "gemma3_text", "gemma3"]
FORMATS = ["modelopt", "compressed-tensors"]
# bf16 activations against a float32 reference: ~1.5% of the largest logit measured; the float32 model with
# the original (unquantized) weights is off by 20-40%, so a wrong or misplaced weight cannot pass.
LOGIT_TOL = 0.03


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def as_bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(as_bits(sa[k]), as_bits(sb[k])), k


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 120, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_load_matches_dequantized_reference(family, fmt, tmp_path, ids):
    hf = cs.hf_model(family)
    ref = cs.write_nvfp4(hf, family, str(tmp_path), fmt)
    model = from_pretrained(str(tmp_path), device="cpu", progress=False)
    assert any(isinstance(m, NVFP4Linear) for m in model.modules())
    want = logits(cs.reference_model(hf, ref), ids)
    assert rel_err(logits(model, ids), want) < LOGIT_TOL
    assert rel_err(logits(hf, ids), want) > 5 * LOGIT_TOL  # the test can tell quantized from original weights


def test_packed_tensors_kept_as_stored(tmp_path):
    """No requantization: fused buffers are the checkpoint's bytes concatenated."""
    cs.write_nvfp4(cs.hf_model("qwen3_moe"), "qwen3_moe", str(tmp_path), "modelopt", shards=1)
    model = from_pretrained(str(tmp_path), device="cpu", progress=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        a = "model.layers.1.self_attn"
        qkv = model.model.layers[1].self_attn.qkv_proj
        assert torch.equal(qkv.weight, torch.cat([f.get_tensor(f"{a}.{p}_proj.weight") for p in "qkv"]))
        assert torch.equal(as_bits(qkv.weight_scale),
                           as_bits(torch.cat([f.get_tensor(f"{a}.{p}_proj.weight_scale") for p in "qkv"])))
        assert qkv.weight_global_scale.item() == f.get_tensor(f"{a}.q_proj.weight_scale_2").item()
        ex = model.model.layers[1].mlp.experts
        e = "model.layers.1.mlp.experts.3"
        assert torch.equal(ex.gate_up_weight[3], torch.cat([f.get_tensor(f"{e}.gate_proj.weight"),
                                                            f.get_tensor(f"{e}.up_proj.weight")]))
        assert torch.equal(ex.down_weight[3], f.get_tensor(f"{e}.down_proj.weight"))
        assert ex.down_weight_global_scale[3].item() == f.get_tensor(f"{e}.down_proj.weight_scale_2").item()
        assert torch.equal(model.model.layers[1].mlp.gate.weight, f.get_tensor("model.layers.1.mlp.gate.weight"))
    assert model.lm_head.weight.dtype == torch.bfloat16  # excluded: stays BF16


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma3"])
def test_quantize_on_load_equals_patch_and_round_trips(family, tmp_path, ids):
    from transformers import AutoModelForCausalLM
    hf = cs.hf_model(family)
    cs.write_bf16(hf, family, str(tmp_path / "bf16"))
    loaded = from_pretrained(str(tmp_path / "bf16"), device="cpu", progress=False)
    patched = adallm.patch(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16),
                           progress=False)
    assert_same_state(loaded, patched)

    save_pretrained(loaded, str(tmp_path / "nvfp4"), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "nvfp4" / "model.safetensors.index.json")
    back = from_pretrained(str(tmp_path / "nvfp4"), device="cpu", progress=False)
    assert_same_state(loaded, back)
    assert torch.equal(logits(back, ids), logits(loaded, ids))
    r = info(str(tmp_path / "nvfp4"))
    layers = hf.config.get_text_config().num_hidden_layers
    per_layer = 4 + (3 * hf.config.num_experts if family == "qwen3_moe" else 3)
    assert (r["format"], r["quant_algo"], r["nvfp4_projections"]) == ("modelopt", "W4A16_NVFP4", layers * per_layer)


def test_saved_layout_is_modelopt(tmp_path):
    """What vLLM's ModelOpt loader reads: per-projection tensors with these dtypes/shapes and both configs."""
    hf = cs.hf_model("qwen3_moe")
    cs.write_nvfp4(hf, "qwen3_moe", str(tmp_path / "src"), "modelopt", kv_scales=True)
    save_pretrained(from_pretrained(str(tmp_path / "src"), device="cpu", progress=False), str(tmp_path / "out"))
    out = tmp_path / "out"
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq == {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": "FP8",
                  "exclude_modules": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "lm_head"]}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quantization"] == hq
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    p = "model.layers.0.self_attn.k_proj"
    assert (t[f"{p}.weight"].dtype, tuple(t[f"{p}.weight"].shape)) == (torch.uint8, (128, 32))
    assert (t[f"{p}.weight_scale"].dtype, tuple(t[f"{p}.weight_scale"].shape)) == (torch.float8_e4m3fn, (128, 4))
    assert (t[f"{p}.weight_scale_2"].dtype, t[f"{p}.weight_scale_2"].dim()) == (torch.float32, 0)
    assert t[f"{p}.input_scale"].item() == pytest.approx(0.01)
    assert t[f"{p}.k_scale"].item() == 0.5 and t["model.layers.0.self_attn.v_proj.v_scale"].item() == 0.25
    e = "model.layers.1.mlp.experts.2"
    assert tuple(t[f"{e}.gate_proj.weight"].shape) == (32, 32) and tuple(t[f"{e}.down_proj.weight"].shape) == (64, 16)
    assert not any("qkv_proj" in k or "gate_up" in k for k in t)
    with safe_open(str(tmp_path / "src" / "model-00001-of-00002.safetensors"), "pt") as f1, \
            safe_open(str(tmp_path / "src" / "model-00002-of-00002.safetensors"), "pt") as f2:
        src = {k: f.get_tensor(k) for f in (f1, f2) for k in f.keys()}
    assert src.keys() == t.keys()
    for k in src:  # loading then saving a ModelOpt checkpoint reproduces it exactly
        assert torch.equal(as_bits(src[k]), as_bits(t[k])), k


def greedy(model, ids, new=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])  # gemma3_text: lm_head tied to the embedding
def test_fp8_lm_head_is_a_load_time_choice(family, tmp_path, ids):
    """from_pretrained(lm_head="fp8") quantizes the stored dense head (tied: the embedding) as patch does.
    save_pretrained writes it dense, dequantized to bf16 and excluded (tied: not at all); from_pretrained with
    lm_head="fp8" makes the same codes and scales from it again, bit for bit, and generates the same tokens; as
    stored (lm_head=None), it loads as that dense head."""
    from transformers import AutoModelForCausalLM
    hf = cs.hf_model(family)
    cs.write_bf16(hf, family, str(tmp_path / "bf16"))
    loaded = from_pretrained(str(tmp_path / "bf16"), device="cpu", lm_head="fp8", progress=False)
    assert isinstance(loaded.lm_head, FP8Linear)
    patched = adallm.patch(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16),
                           lm_head="fp8", progress=False)
    assert_same_state(loaded, patched)

    out = tmp_path / "nvfp4"
    save_pretrained(loaded, str(out))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.startswith("lm_head.")}
    tied = family == "gemma3_text"
    assert hf.config.tie_word_embeddings is tied
    if tied:
        assert stored == {}
    else:
        assert stored.keys() == {"lm_head.weight"}
        assert torch.equal(stored["lm_head.weight"], loaded.lm_head.dequantize(torch.bfloat16))
    assert "lm_head" in json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    back = from_pretrained(str(out), device="cpu", lm_head="fp8", progress=False)
    assert isinstance(back.lm_head, FP8Linear)
    assert_same_state(loaded, back)  # FP8 codes and scales included
    assert torch.equal(greedy(back, ids), greedy(loaded, ids))
    dense = from_pretrained(str(out), device="cpu", progress=False)
    assert type(dense.lm_head) is torch.nn.Linear
    if tied:
        assert dense.lm_head.weight is dense.model.embed_tokens.weight
    else:
        assert torch.equal(dense.lm_head.weight, loaded.lm_head.dequantize(torch.bfloat16))


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_nvfp4_lm_head_on_load(family, tmp_path):
    """lm_head="nvfp4" quantizes a stored dense head (tied: the embedding) on load as patch does; a stored NVFP4
    head loads as stored, and only as "nvfp4"."""
    from transformers import AutoModelForCausalLM
    cs.write_bf16(cs.hf_model(family), family, str(tmp_path / "bf16"))
    loaded = from_pretrained(str(tmp_path / "bf16"), device="cpu", lm_head="nvfp4", progress=False)
    assert isinstance(loaded.lm_head, NVFP4Linear)
    patched = adallm.patch(AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16),
                           lm_head="nvfp4", progress=False)
    assert_same_state(loaded, patched)
    save_pretrained(loaded, str(tmp_path / "out"))
    for lm_head in (None, "nvfp4"):
        assert_same_state(loaded, from_pretrained(str(tmp_path / "out"), device="cpu", lm_head=lm_head,
                                                  progress=False))
    for lm_head in ("dense", "fp8"):
        with pytest.raises(CheckpointError, match=rf"stores lm_head in NVFP4; .*not as lm_head='{lm_head}'"):
            from_pretrained(str(tmp_path / "out"), device="cpu", lm_head=lm_head, progress=False)


def test_nvfp4_lm_head_from_a_dense_head_of_an_nvfp4_checkpoint(tmp_path, recwarn):
    """A ModelOpt checkpoint keeping lm_head in BF16 (excluded), loaded with lm_head="nvfp4": the head is quantized
    on load as patch would (no warning: it was asked for), the decoder stays as stored."""
    hf = cs.hf_model("qwen3")
    cs.write_nvfp4(hf, "qwen3", str(tmp_path), "modelopt")
    stored = from_pretrained(str(tmp_path), device="cpu", progress=False)
    assert type(stored.lm_head) is torch.nn.Linear
    m = from_pretrained(str(tmp_path), device="cpu", lm_head="nvfp4", progress=False)
    want = NVFP4Linear.from_dense([stored.lm_head])
    assert torch.equal(m.lm_head.weight, want.weight) and torch.equal(as_bits(m.lm_head.weight_scale),
                                                                      as_bits(want.weight_scale))
    sa, sb = stored.state_dict(), m.state_dict()
    assert all(torch.equal(as_bits(sa[k]), as_bits(sb[k])) for k in sa if not k.startswith("lm_head."))
    assert not [w for w in recwarn if "quantized on load" in str(w.message)]


def test_unknown_lm_head_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lm_head='bf16'; choose one of \('dense', 'fp8', 'nvfp4'\)"):
        from_pretrained(str(tmp_path), device="cpu", lm_head="bf16", progress=False)


def test_different_global_scales_in_a_fused_group(tmp_path, ids):
    """q/k/v with different globals: exact. A power-of-two ratio fuses (block scales re-expressed without
    rounding); any other ratio keeps the parts as separate NVFP4 modules."""
    hf = cs.hf_model("qwen3")
    ref = cs.write_nvfp4(hf, "qwen3", str(tmp_path / "pow2"), "modelopt", global_ratio={r"k_proj": 0.5})
    m = from_pretrained(str(tmp_path / "pow2"), device="cpu", progress=False)
    qkv = m.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, NVFP4Linear)
    want = torch.cat([ref[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv.dequantize(torch.float32), want.float())  # fp32: one rounding of code*scale*global

    ref = cs.write_nvfp4(hf, "qwen3", str(tmp_path / "odd"), "modelopt", global_ratio={r"k_proj": 0.7, r"up_proj": 0.9})
    m = from_pretrained(str(tmp_path / "odd"), device="cpu", progress=False)
    assert isinstance(m.model.layers[0].self_attn.qkv_proj, SeparateParts)
    assert isinstance(m.model.layers[0].mlp.gate_up_proj, SeparateParts)
    k = m.model.layers[0].self_attn.qkv_proj.linears[1]
    assert torch.equal(k.dequantize(torch.float32), ref["model.layers.0.self_attn.k_proj.weight"].float())
    reference = cs.reference_model(hf, ref)
    assert rel_err(logits(m, ids), logits(reference, ids)) < LOGIT_TOL
    one = ids[:1, :1]  # one row: the MLP's one-row path (nvfp4_linear_glu) must not take the separate parts
    assert rel_err(logits(m, one), logits(reference, one)) < LOGIT_TOL
    save_pretrained(m, str(tmp_path / "resaved"))
    assert_same_state(m, from_pretrained(str(tmp_path / "resaved"), device="cpu", progress=False))


def test_moe_experts_with_different_gate_up_globals_warn(tmp_path):
    hf = cs.hf_model("qwen3_moe")
    cs.write_nvfp4(hf, "qwen3_moe", str(tmp_path), "modelopt", global_ratio={r"experts\.1\.up_proj": 0.7})
    with pytest.warns(UserWarning, match=r"experts: gate_proj and up_proj .* re-rounded.*largest change of a "
                                         r"block: 4\.76%"):
        from_pretrained(str(tmp_path), device="cpu", progress=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_excluded_decoder_projections_are_quantized_on_load_with_a_warning(fmt, tmp_path, ids):
    """A checkpoint may keep some decoder projections in BF16; AdaLLM runs them in NVFP4 and says so. Whole
    group excluded (layer 1 q/k/v/o): one shared global; part of a group (layer 0 k_proj): its own global."""
    hf = cs.hf_model("qwen3")
    keep = ("model.layers.0.self_attn.k_proj", *(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"))
    ref = cs.write_nvfp4(hf, "qwen3", str(tmp_path), fmt, keep_bf16=keep)
    with pytest.warns(UserWarning, match=r"5 decoder projections are excluded from quantization in this checkpoint "
                                         r"\(stored unquantized\), e\.g\. model\.layers\.0\.self_attn\.k_proj"):
        # rtn: the reference below re-derives the ModelOpt recipe
        m = from_pretrained(str(tmp_path), device="cpu", progress=False, method="rtn")
    sd = cs.hub_tensors(hf, "qwen3")
    attn = "model.layers.1.self_attn"
    w = [sd[f"{attn}.{p}_proj.weight"].to(torch.bfloat16) for p in "qkv"]
    g = torch.tensor(max(x.abs().amax().float().item() for x in w) / 2688.0)
    for p, x in zip("qkv", w):  # the ModelOpt recipe with the group's shared global
        ref[f"{attn}.{p}_proj.weight"] = cs.dequant64(*torch.ops.adallm.nvfp4_quantize(x.float(), g), g.item())
    for name in ("model.layers.0.self_attn.k_proj.weight", f"{attn}.o_proj.weight"):  # alone: its own global
        x = sd[name].to(torch.bfloat16)
        g = torch.tensor(x.abs().amax().float().item() / 2688.0)
        ref[name] = cs.dequant64(*torch.ops.adallm.nvfp4_quantize(x.float(), g), g.item())
    assert torch.equal(m.model.layers[1].self_attn.qkv_proj.dequantize(torch.float32),
                       torch.cat([ref[f"{attn}.{p}_proj.weight"] for p in "qkv"]).float())
    assert rel_err(logits(m, ids), logits(cs.reference_model(hf, ref), ids)) < LOGIT_TOL


def test_checkpoint_scales_recorded(tmp_path):
    cs.write_nvfp4(cs.hf_model("qwen3"), "qwen3", str(tmp_path), "modelopt", kv_scales=True)
    m = from_pretrained(str(tmp_path), device="cpu", progress=False)
    x = m.adallm_extra_tensors
    assert x["model.layers.1.self_attn.k_proj.k_scale"].item() == 0.5
    assert x["model.layers.1.self_attn.o_proj.input_scale"].item() == pytest.approx(0.01)


def test_info_reports(tmp_path):
    cs.write_nvfp4(cs.hf_model("gemma3"), "gemma3", str(tmp_path), "compressed-tensors")
    r = info(str(tmp_path))
    assert (r["format"], r["quant_algo"], r["model_type"], r["layers"], r["files"]) == \
        ("compressed-tensors", "NVFP4", "gemma3", 2, 2)
    assert r["nvfp4_projections"] == 14 and r["nvfp4_params"] == 2 * (256 * 64 * 2 + 128 * 64 * 2 + 96 * 64 * 3)
    assert "re:vision_tower.*" in r["excluded_by_config"]
    assert "language_model.model.embed_tokens" in r["unquantized_matrices"]
    assert r["bytes_nvfp4_as_bf16"] == 2 * r["nvfp4_params"]


def test_hub_id_goes_through_huggingface_hub(monkeypatch, tmp_path):
    """A name that is not a directory resolves with snapshot_download (stubbed: tests stay offline)."""
    import huggingface_hub
    cs.write_nvfp4(cs.hf_model("qwen3"), "qwen3", str(tmp_path), "modelopt")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None, allow_patterns=None: calls.append(repo) or str(tmp_path))
    m = from_pretrained("nvidia/Qwen3-tiny-FP4", device="cpu", progress=False)
    assert calls == ["nvidia/Qwen3-tiny-FP4"] and isinstance(m.model.layers[0].self_attn.qkv_proj, NVFP4Linear)


# ----------------------------------------------------------------------------------------------------
# Errors: each names the file/tensor and the problem.


@pytest.fixture
def qwen3_ckpt(tmp_path):
    cs.write_nvfp4(cs.hf_model("qwen3"), "qwen3", str(tmp_path), "modelopt", shards=2)
    return tmp_path


def _load(path):
    return from_pretrained(str(path), device="cpu", progress=False)


def test_error_truncated_shard(qwen3_ckpt):
    shard = qwen3_ckpt / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors: not a readable safetensors file .*"
                                         r"truncated or corrupt"):
        _load(qwen3_ckpt)


def test_error_corrupt_header(qwen3_ckpt):
    shard = qwen3_ckpt / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"\xff" * 16 + shard.read_bytes()[16:])
    with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors: not a readable safetensors file"):
        _load(qwen3_ckpt)


def test_error_missing_shard(qwen3_ckpt):
    os.remove(qwen3_ckpt / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json names shard 'model-00002-of-00002\."
                                         r"safetensors', which is missing"):
        _load(qwen3_ckpt)


def test_error_missing_tensor(tmp_path):
    hf = cs.hf_model("qwen3")
    cs.write_nvfp4(hf, "qwen3", str(tmp_path), "modelopt", shards=1)
    from safetensors.torch import load_file, save_file
    t = load_file(str(tmp_path / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight_scale' \(NVFP4 block "
                                         r"scales\) is missing"):
        _load(tmp_path)


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_error_shape_disagrees_with_config(qwen3_ckpt):
    _edit_json(qwen3_ckpt / "config.json", lambda d: d.update(intermediate_size=112))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \(96, 32\) but the "
                                         r"config needs \(112, 32\)"):
        _load(qwen3_ckpt)


@pytest.mark.parametrize("algo", ["FP8", "W4A8_AWQ", "NVFP4_AWQ"])
def test_error_unsupported_quant_algo(qwen3_ckpt, algo):
    _edit_json(qwen3_ckpt / "config.json", lambda d: d["quantization_config"]["quantization"].update(quant_algo=algo))
    with pytest.raises(ValueError, match=rf"config\.json: unsupported quantization: ModelOpt quant_algo '{algo}'"):
        _load(qwen3_ckpt)


def test_error_unsupported_compressed_tensors_scheme(tmp_path):
    cs.write_nvfp4(cs.hf_model("qwen3"), "qwen3", str(tmp_path), "compressed-tensors")

    def int4(d):
        qc = d["quantization_config"]
        qc["format"] = "pack-quantized"
        qc["config_groups"]["group_0"].update(format="pack-quantized", weights={
            "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128})
    _edit_json(tmp_path / "config.json", int4)
    with pytest.raises(ValueError, match=r"unsupported quantization: compressed-tensors group 'group_0' with format "
                                         r"'pack-quantized', weights \{num_bits: 4, type: 'int'"):
        _load(tmp_path)


def test_error_unknown_quant_method(qwen3_ckpt):
    _edit_json(qwen3_ckpt / "config.json", lambda d: d.update(quantization_config={"quant_method": "gptq"}))
    with pytest.raises(ValueError, match=r"unsupported quantization: quant_method 'gptq'"):
        _load(qwen3_ckpt)


def test_error_unknown_architecture(qwen3_ckpt):
    _edit_json(qwen3_ckpt / "config.json", lambda d: d.update(model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(ValueError, match=r"config\.json: unknown architecture \['LlamaForCausalLM'\] \(model_type "
                                         r"'llama'\); AdaLLM supports"):
        _load(qwen3_ckpt)


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: no config.json")):
        _load(tmp_path)
