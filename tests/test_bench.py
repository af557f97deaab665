"""`adallm bench` on CPU: the timing functions are stubbed (they need CUDA), everything else runs for real on tiny
random models: the flag plumbing of --lm-head, the recorded field and row label, and the weight-bytes floor."""
import json
import subprocess

import pytest
import torch
from integration_common import tiny_model
from torch import nn

from adallm import bench
from adallm.linear import FP8Linear, NVFP4Linear


def _head_bytes(lm_head: str, n: int, k: int) -> int:
    return {"dense": n * k * 2,  # bf16 [N, K]
            "fp8": n * k + n * 4,  # e4m3 codes [N, K], fp32 scale per row [N]
            "nvfp4": n * k // 2 + n * k // 16 + 4,  # codes uint8 [N, K/2], e4m3 scales [N, K/16], fp32 global scale
            }[lm_head]


def _stub_gpu(monkeypatch, build_model, measure):
    """bench as on a GPU, with these build_model and measure, a fixed copy bandwidth (1e12 B/s) and prefill rate."""
    monkeypatch.setattr(bench, "build_model", build_model)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 1e12)
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "measure_prefill", lambda *a, **kw: 1e4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu (stubbed)")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])  # gemma3: lm_head tied to the embedding
@pytest.mark.parametrize("lm_head", ["dense", "fp8", "nvfp4"])
def test_bench_lm_head(family, lm_head, monkeypatch, tmp_path, capsys):
    model = tiny_model(family)
    embed = model.get_input_embeddings().weight.detach().clone()
    heads = []  # (row being measured, lm_head module type) as generate would see them

    def fake_measure(m, batch, prompt_len, new_tokens, repeats=3, **kw):
        heads.append(("bf16" if kw.get("cache_implementation") == "static" else "adallm", type(m.lm_head)))
        return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, ttft_ms=1.0, decode_ms_per_step=1.0,
                    decode_tok_s=batch * 1e3, peak_gib=1.0)

    _stub_gpu(monkeypatch, lambda name: model, fake_measure)
    out = tmp_path / "bench.json"
    bench.main(["tiny", "--batches", "1", "--out", str(out)] + (["--lm-head", lm_head] if lm_head != "dense" else []))
    res = json.loads(out.read_text())
    text = capsys.readouterr().out

    label = {"dense": "adallm", "fp8": "adallm+fp8_head", "nvfp4": "adallm+nvfp4_head"}[lm_head]
    assert res["lm_heads"] == [lm_head] and "quantize_lm_head" not in res
    assert list(res["rows"]) == ["bf16", label] and list(res["decode_speedup"]) == [label]
    assert f"\n{label} " in text and f"lm_head {label}: {dict(dense='BF16', fp8='FP8', nvfp4='NVFP4')[lm_head]})" in text
    assert heads == [("bf16", nn.Linear), ("adallm", dict(dense=nn.Linear, fp8=FP8Linear, nvfp4=NVFP4Linear)[lm_head])]
    assert torch.equal(model.get_input_embeddings().weight, embed)  # a tied embedding stays exact

    # the floor: the lm_head counted once, at its own size (BF16 when dense, tied or not)
    cfg = model.config
    v, h = cfg.vocab_size, cfg.hidden_size
    decoder = sum(t.numel() * t.element_size() for t in (*model.model.layers.parameters(), *model.model.layers.buffers(),
                                                        *model.model.norm.parameters()))
    expected = decoder + _head_bytes(lm_head, v, h) + h * 2  # + one embedding row
    assert res["rows"][label]["weight_bytes_per_token"] == expected
    assert res["rows"][label]["decode"][0]["floor_ms"] == pytest.approx(expected / 1e12 * 1e3)
    bf16 = res["rows"]["bf16"]["weight_bytes_per_token"]
    assert bf16 - expected > _head_bytes("dense", v, h) - _head_bytes(lm_head, v, h)  # the head's + the decoder's saving


def test_bench_several_lm_heads_one_baseline(monkeypatch, tmp_path):
    """--lm-head dense,fp8: one BF16 baseline, then one AdaLLM row per kind, each on a freshly built model."""
    built, measured = [], []

    def build(name):
        built.append(tiny_model("qwen3"))
        return built[-1]

    def fake_measure(m, batch, prompt_len, new_tokens, repeats=3, **kw):
        measured.append(("bf16" if kw.get("cache_implementation") == "static" else type(m.lm_head).__name__,
                         len(built)))
        return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, ttft_ms=1.0,
                    decode_ms_per_step=1.0 if kw.get("cache_implementation") == "static" else 0.25,
                    decode_tok_s=batch * 1e3, peak_gib=1.0)

    _stub_gpu(monkeypatch, build, fake_measure)
    out = tmp_path / "bench.json"
    bench.main(["tiny", "--batches", "1,4", "--lm-head", "dense,fp8", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["lm_heads"] == ["dense", "fp8"] and list(res["rows"]) == ["bf16", "adallm", "adallm+fp8_head"]
    assert measured == [("bf16", 1)] * 2 + [("Linear", 1)] * 2 + [("FP8Linear", 2)] * 2
    assert set(res["decode_speedup"]) == set(res["prefill_ratio"]) == {"adallm", "adallm+fp8_head"}
    assert res["decode_speedup"]["adallm+fp8_head"] == {"1": 1.0, "4": 1.0}
    assert isinstance(built[1].lm_head, FP8Linear) and isinstance(built[0].lm_head, nn.Linear)
    fp8, dense = (res["rows"][k]["weight_bytes_per_token"] for k in ("adallm+fp8_head", "adallm"))
    cfg = built[0].config
    assert dense - fp8 == _head_bytes("dense", cfg.vocab_size, cfg.hidden_size) - _head_bytes(
        "fp8", cfg.vocab_size, cfg.hidden_size)


def test_bench_lm_head_flag(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "--lm-head KINDS" in capsys.readouterr().out
    for bad in ("bf16", "fp8,fp8", "int4"):  # refused before anything is built or measured
        with pytest.raises(ValueError, match="choose one of|each kind once"):
            bench.main(["tiny", "--lm-head", bad])


def test_git_commit_marks_a_tree_that_differs_from_its_commit(tmp_path, monkeypatch):
    """Result files name the commit measured. A tree whose tracked files differ from it (uncommitted edits, or files
    copied over an older .git, as on the GPU machine) must say so instead of naming code that did not run."""
    monkeypatch.delenv("GIT_COMMIT", raising=False)

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert bench.git_commit(str(tmp_path)) == head
    (tmp_path / "f.py").write_text("a = 2\n")
    assert bench.git_commit(str(tmp_path)) == head + "-dirty"
    monkeypatch.setenv("GIT_COMMIT", "given")
    assert bench.git_commit(str(tmp_path)) == "given"
