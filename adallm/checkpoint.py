"""Loading NVFP4 checkpoints packed, quantizing BF16 checkpoints on load, and saving ModelOpt checkpoints.

    model = adallm.from_pretrained("nvidia/Qwen3-8B-FP4", device="cuda")       # ModelOpt or compressed-tensors
    model = adallm.from_pretrained("Qwen/Qwen3-8B", device="cuda")             # BF16: quantized layer by layer
    adallm.save_pretrained(model, "qwen3-8b-nvfp4/", tokenizer=tok)           # ModelOpt layout

How a load works: the transformers model is built with its parameters on the meta device (buffers such
as RoPE's inv_freq are computed for real), `adallm.patch(quantize=False)` swaps in empty NVFP4 modules, and
then every tensor is read from the memory-mapped safetensors straight into its final buffer on `device`,
module by module. A packed weight is never expanded; a BF16 source weight (quantize-on-load) exists only
for the one fused group being quantized. Everything is checked (files, names, shapes, dtypes) before or as
it is read, and any failure raises CheckpointError naming the file/tensor: no half-loaded model escapes.

Fused groups: AdaLLM runs q/k/v (and gate/up) as one NVFP4 weight with ONE global scale. Checkpoints
store the parts separately, each with its own global (ModelOpt and llm-compressor normally give a fused
group one shared global, so the parts concatenate as they are). When the globals differ, the parts are
still fused exactly if every block scale can be re-expressed on the largest global without rounding
(s * g_part / g_max representable in E4M3: e.g. power-of-two ratios). Otherwise re-rounding the E4M3
block scales would change the weights (measured on Gaussian 1024x4096 weights, ratio 0.7: +2.9% relative
RMS error on top of NVFP4's own 9.5%, up to 4.8% per block; ratio 0.93: +2.3%), so:
  - dense projections: the group is kept as separate NVFP4 modules (exact; one GEMV per part);
  - MoE experts (one global per expert for gate_up, fixed by the op contract): the scales are re-rounded
    and a warning reports the largest relative change.
Decoder projections that an NVFP4 checkpoint keeps unquantized (its exclude_modules / ignore) are
quantized on load with the ModelOpt recipe, with a warning: AdaLLM's attention and MLP modules run NVFP4
only. Embeddings, norms, MoE routers and vision towers stay as stored; lm_head too unless from_pretrained's
`lm_head` asks to quantize a stored dense head (FP8 or NVFP4, after the dense weights are in; a tied head from the
embedding).

An FP8 lm_head is a load-time choice: the ModelOpt format has no per-row FP8 weight-only entry, so save_pretrained
writes it as a dense head (dequantized to the model's dtype; nothing where the config ties it to the embedding),
and from_pretrained(..., lm_head="fp8") makes the same codes and scales from it again (bf16/fp16 models).
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import compressed_tensors, modelopt, nvfp4
from .formats import CheckpointError, QuantSpec, unsupported
from .linear import FP8Linear, NVFP4Linear
from .mlp import NVFP4Experts
from .safetensors_io import SafetensorsReader, write_sharded

__all__ = ["from_pretrained", "save_pretrained", "resolve", "read_config", "detect_quantization", "CheckpointError"]

# model_type -> what AdaLLM patches; the multimodal Gemma3 has its text tower patched.
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text")
FORMATS = {modelopt.NAME: modelopt, compressed_tensors.NAME: compressed_tensors}
# transformers 4.x spellings of Gemma3ForConditionalGeneration tensors (what most hub checkpoints use) ->
# the transformers 5 module names.
KEY_RENAMES = [(re.compile(r"^language_model\.model\."), "model.language_model."),
               (re.compile(r"^language_model\.lm_head\."), "lm_head."),
               (re.compile(r"^vision_tower\."), "model.vision_tower."),
               (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector.")]
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


# --------------------------------------------------------------------------------------------------
# Locating and describing a checkpoint


def resolve(name_or_path: str, revision: str | None = None) -> str:
    """A local directory as is; otherwise a Hub repo id, downloaded (weights, configs, tokenizer) or taken
    from the local cache."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise CheckpointError(f"adallm: {name_or_path} is a file; pass the checkpoint directory")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_path, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # noqa: BLE001  (hub errors are many types; all mean "cannot get it")
        raise CheckpointError(f"adallm: {name_or_path!r} is not a local directory and could not be fetched from "
                              f"the Hugging Face Hub ({type(e).__name__}: {e})") from e


def read_config(path: str):
    """config.json -> transformers config; raises on an architecture AdaLLM does not run."""
    from transformers import AutoConfig
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(f"adallm: {path}: no config.json")
    with open(file) as f:
        raw = json.load(f)
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"adallm: {file}: unknown architecture {raw.get('architectures')} "
                              f"(model_type {mt!r}); AdaLLM supports model_type {SUPPORTED_MODEL_TYPES}")
    return AutoConfig.from_pretrained(path), raw


def detect_quantization(raw_config: dict, path: str) -> QuantSpec | None:
    """The checkpoint's NVFP4 quantization (config.json quantization_config, else hf_quant_config.json);
    None for an unquantized checkpoint. Raises on any other quantization."""
    qc = raw_config.get("quantization_config")
    source = os.path.join(path, "config.json")
    hf_quant = os.path.join(path, "hf_quant_config.json")
    if qc is None and os.path.exists(hf_quant):
        with open(hf_quant) as f:
            qc, source = {"quant_method": modelopt.NAME, **json.load(f)}, hf_quant
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in FORMATS:
        raise unsupported(source, f"quant_method {qc.get('quant_method')!r}", f"quant_method in {tuple(FORMATS)}")
    return FORMATS[method].parse(qc, source)


def normalized_keys(reader: SafetensorsReader) -> dict[str, str]:
    """model-namespace tensor name -> name in the checkpoint."""
    out = {}
    for k in reader.keys():
        m = k
        for pat, rep in KEY_RENAMES:
            m = pat.sub(rep, m)
        out[m] = k
    return out


# --------------------------------------------------------------------------------------------------
# Sources of NVFP4 weights: a packed checkpoint, or BF16 tensors quantized on the fly


@dataclass
class Part:
    """One projection of a fused group: its NVFP4 weight (on its way to `device`) and activation scale."""

    q: nvfp4.NVFP4Weight
    input_scale: torch.Tensor | None = None


class Source:
    """Reads tensors by model-namespace name from one checkpoint, checking shape and dtype."""

    def __init__(self, reader: SafetensorsReader, spec: QuantSpec | None, device: torch.device,
                 method: str = nvfp4.DEFAULT_METHOD) -> None:
        self.reader, self.spec, self.device, self.method = reader, spec, device, method
        self.fmt = FORMATS[spec.format] if spec else None
        self.names = normalized_keys(reader)
        self.modules = {m.rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for m, k in self.names.items()}
        # projections an NVFP4 checkpoint keeps unquantized (excluded) that AdaLLM runs in NVFP4
        self.quantized_on_load: list[str] = []

    def ckpt_name(self, name: str) -> str:
        return self.names.get(name, name)

    def has(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str, shape: tuple[int, ...], dtype: str | tuple[str, ...], what: str) -> torch.Tensor:
        """The tensor `name` (model spelling), after checking it is there with this shape and dtype."""
        cname = self.ckpt_name(name)
        if cname not in self.reader:
            raise CheckpointError(f"adallm: {self.reader.directory}: tensor {cname!r} ({what}) is missing from the "
                                  f"checkpoint")
        got_shape, got_dtype = self.reader.meta(cname)
        dtypes = (dtype,) if isinstance(dtype, str) else dtype
        if got_shape != tuple(shape) and not (len(shape) == 0 and got_shape == (1,)):
            raise CheckpointError(f"adallm: {self.reader.where(cname)} has shape {got_shape} but the config needs "
                                  f"{tuple(shape)} ({what})")
        if "*" not in dtypes and got_dtype not in dtypes:
            raise CheckpointError(f"adallm: {self.reader.where(cname)} has dtype {got_dtype}, expected "
                                  f"{' or '.join(dtypes)} ({what})")
        # copy=True: on the CPU, a tensor must not stay a view of the file mapping (re-saving into the same
        # directory would truncate the file under it).
        return self.reader.get(cname).to(self.device, copy=True)

    def quantized(self, module: str) -> bool:
        """Is projection `module` (model spelling) stored packed in this checkpoint?"""
        return self.spec is not None and not self.spec.is_excluded(module, self.modules.get(module, module))

    def group(self, prefixes: list[str], sizes: list[int], k: int) -> list[Part]:
        """A fused group of projections [N_i, K] as NVFP4 parts on device: packed ones as stored, the
        others quantized here (one shared global when the whole group is unquantized)."""
        packed = [self.quantized(p) for p in prefixes]
        dense = {p: self.get(f"{p}.weight", (n, k), ("BF16", "F16", "F32"), "unquantized weight")
                 for p, n, q in zip(prefixes, sizes, packed) if not q}
        if self.spec is not None:
            self.quantized_on_load += list(dense)
        if not any(packed):
            return [Part(q) for q in nvfp4.quantize_group(list(dense.values()), prefixes, method=self.method)]
        return [self._packed(p, n, k) if q else Part(nvfp4.quantize(dense[p], name=p, method=self.method))
                for p, n, q in zip(prefixes, sizes, packed)]

    def _packed(self, prefix: str, n: int, k: int) -> Part:
        t = self.fmt.tensor_names(prefix)
        w = self.get(t["weight"], (n, k // 2), "U8", "packed NVFP4 weight")
        s = self.get(t["scale"], (n, k // 16), "F8_E4M3", "NVFP4 block scales")
        g = self.fmt.global_from_disk(self.get(t["global"], (), "F32", "NVFP4 global scale"))
        if not bool(torch.isfinite(g) & (g > 0)):
            raise CheckpointError(f"adallm: {self.reader.where(self.ckpt_name(t['global']))}: global scale "
                                  f"{g.item()} is not a positive finite number")
        inp = None
        if self.has(t["input"]):
            inp = self.fmt.input_from_disk(self.get(t["input"], (), "F32", "activation scale")).cpu()
        return Part(nvfp4.NVFP4Weight(w, s, g), inp)


# --------------------------------------------------------------------------------------------------
# Fusing parts under one global scale


def rescale(q: nvfp4.NVFP4Weight, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-expresses q's block scales on global g (codes unchanged). Returns (new e4m3 scales, the largest
    relative change of a block's dequantization factor; 0 means exact)."""
    factor = q.weight_scale.float() * q.weight_global_scale
    new = (factor / g).clamp(max=448.0).to(torch.float8_e4m3fn)
    err = ((new.float() * g - factor).abs() / factor.clamp_min(torch.finfo(torch.float32).tiny)).amax()
    return new, err


def fuse(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Concatenates parts along N under the largest global: (weight, weight_scale, global, max relative
    change of any block factor: 0.0 when exact, always for equal globals)."""
    g = torch.stack([p.q.weight_global_scale for p in parts]).amax()
    scales, worst = [], 0.0
    for p in parts:
        if bool(p.q.weight_global_scale == g):
            scales.append(p.q.weight_scale)
        else:
            s, err = rescale(p.q, g)
            scales.append(s)
            worst = max(worst, err.item())
    return torch.cat([p.q.weight for p in parts]), torch.cat(scales), g, worst


# --------------------------------------------------------------------------------------------------
# Building and filling the model


@contextmanager
def _params_on_meta():
    """Parameters created inside go to the meta device; buffers (RoPE inv_freq, embed_scale) stay real, so
    modules compute them as usual."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(config)
    # The model AdaLLM returns holds its weights in adallm modules; transformers' own handling of the
    # checkpoint's quantization_config must not run on it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _set(module: nn.Module, name: str, t: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[name] = t


def _is_experts(module: nn.Module) -> bool:
    return isinstance(module, NVFP4Experts)


def _fill_linear(mod: NVFP4Linear, path: str, src: Source, extras: dict[str, torch.Tensor]) -> nn.Module:
    """Loads one (fused) NVFP4Linear; returns the module to put at `path` (mod itself, or separate
    per-part modules when the parts' global scales cannot be shared exactly)."""
    parent = path.rsplit(".", 1)[0]
    prefixes = [f"{parent}.{p}" for p in mod.parts] if mod.parts else [path]
    sizes = list(mod.part_sizes) if mod.parts else [mod.out_features]
    parts = src.group(prefixes, sizes, mod.in_features)
    _keep_input_scales(prefixes, parts, extras)
    if mod.bias is not None:
        _set(mod, "bias", torch.cat([src.get(f"{p}.bias", (n,), ("BF16", "F16", "F32"), "bias")
                                     for p, n in zip(prefixes, sizes)]).to(mod.bias.dtype))
    weight, scale, g, worst = fuse(parts)
    if worst > 0:
        return SeparateParts(mod, parts)
    _set(mod, "weight", weight)
    _set(mod, "weight_scale", scale)
    _set(mod, "weight_global_scale", g.reshape(()))
    return mod


def _keep_input_scales(prefixes: list[str], parts: list[Part], extras: dict[str, torch.Tensor]) -> None:
    """Activation scales, under their ModelOpt names (save_pretrained writes them back)."""
    for p, part in zip(prefixes, parts):
        if part.input_scale is not None:
            extras[modelopt.tensor_names(p)["input"]] = part.input_scale


def _fill_experts(mod: nn.Module, path: str, src: Source, extras: dict[str, torch.Tensor]) -> None:
    """Per-expert tensors {path}.{e}.{gate,up,down}_proj -> the fused expert buffers."""
    e_count, two_i, half_h = mod.gate_up_weight.shape
    inter, hidden = two_i // 2, half_h * 2
    out = {k: torch.empty(b.shape, dtype=b.dtype, device=src.device) for k, b in mod._buffers.items()
           if k.startswith(("gate_up_", "down_"))}
    worst = 0.0
    for e in range(e_count):
        names = [f"{path}.{e}.{p}_proj" for p in ("gate", "up", "down")]
        gate_up = src.group(names[:2], [inter, inter], hidden)
        (down,) = src.group(names[2:], [hidden], inter)
        _keep_input_scales(names, [*gate_up, down], extras)
        w, s, g, err = fuse(gate_up)
        worst = max(worst, err)
        out["gate_up_weight"][e], out["gate_up_weight_scale"][e], out["gate_up_weight_global_scale"][e] = w, s, g
        q = down.q
        out["down_weight"][e], out["down_weight_scale"][e], out["down_weight_global_scale"][e] = \
            q.weight, q.weight_scale, q.weight_global_scale
    if worst > 0:
        warnings.warn(f"adallm: {path}: gate_proj and up_proj of some experts have different global scales; their "
                      f"E4M3 block scales were re-rounded onto one global per expert (largest change of a block: "
                      f"{worst:.2%})", stacklevel=3)
    for k, t in out.items():
        _set(mod, k, t)


class SeparateParts(nn.Module):
    """A fused group whose parts could not share one global scale exactly: one NVFP4Linear per part, run
    one after another, outputs concatenated. Same interface as the fused NVFP4Linear it replaces."""

    def __init__(self, fused: NVFP4Linear, parts: list[Part]) -> None:
        super().__init__()
        self.in_features, self.out_features = fused.in_features, fused.out_features
        self.parts, self.part_sizes = fused.parts, fused.part_sizes
        self.linears = nn.ModuleList()
        biases = fused.bias.split(fused.part_sizes) if fused.bias is not None else [None] * len(parts)
        for part, n, b in zip(parts, fused.part_sizes, biases):
            lin = NVFP4Linear(fused.in_features, n, bias=b is not None, device="meta")
            _set(lin, "weight", part.q.weight)
            _set(lin, "weight_scale", part.q.weight_scale)
            _set(lin, "weight_global_scale", part.q.weight_global_scale.reshape(()))
            if b is not None:
                _set(lin, "bias", b.clone())
            self.linears.append(lin)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        if norm is not None:  # normalized once for all parts (NVFP4Linear.forward's norm)
            x = norm(x)
        return torch.cat([lin(x) for lin in self.linears], dim=-1)

    def split_outputs(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.part_sizes, dim=-1)


# --------------------------------------------------------------------------------------------------
# from_pretrained


def _default_device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _ties_embeddings(model: nn.Module) -> bool:
    """Does the config tie lm_head to the input embedding (whatever lm_head has become since)?"""
    cfg = model.config
    tie = getattr(cfg, "tie_word_embeddings", None)
    return bool(getattr(cfg.get_text_config(), "tie_word_embeddings", False) if tie is None else tie)


def _tied_targets(model: nn.Module) -> dict[str, str]:
    """{tied parameter: the parameter it shares} when the config ties the embeddings."""
    return dict(getattr(model, "_tied_weights_keys", None) or {}) if _ties_embeddings(model) else {}


def _stored_lm_head(src: Source) -> str:
    """What the checkpoint stores lm_head as: "nvfp4" (packed) or "dense" (or nothing: tied to the embedding)."""
    return "nvfp4" if src.spec is not None and src.has(src.fmt.tensor_names("lm_head")["scale"]) else "dense"


def from_pretrained(name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                    *, lm_head: str | None = None, method: str = nvfp4.DEFAULT_METHOD, revision: str | None = None,
                    progress: bool = True) -> nn.Module:
    """Loads a Qwen3 / Qwen3-MoE / Gemma3 checkpoint as an AdaLLM-patched transformers model on `device`.

    name_or_path: local directory or Hub repo id. An NVFP4 checkpoint (ModelOpt or compressed-tensors) is
    loaded packed, as stored; an unquantized one is quantized on load, fused group by fused group on
    `device` (peak memory: the NVFP4 model plus one layer's BF16 group), with `method` as in adallm.patch.
    lm_head: None (default) as stored (NVFP4 if the checkpoint stores it packed, else dense); "dense",
    "fp8", "nvfp4" as in adallm.patch. A stored dense head (or, tied, the embedding) is quantized to "fp8" or
    "nvfp4" (with `method`) on `device` once the dense weights are in, and the dense head is freed; a stored
    NVFP4 head is only loaded as "nvfp4" (CheckpointError otherwise: it is not requantized or expanded).
    dtype: activations and the unquantized tensors (embeddings, norms, routers, excluded modules).
    device: default cuda when available, else cpu.
    Checkpoint activation scales (input_scale) and KV scales (k_scale / v_scale) are kept in
    `model.adallm_extra_tensors` so save_pretrained writes them back.
    """
    from .patching import check_lm_head, patch, set_lm_head

    if lm_head is not None:
        check_lm_head(lm_head)
    device = _default_device(device)
    path = resolve(name_or_path, revision)
    config, raw = read_config(path)
    spec = detect_quantization(raw, path)
    reader = SafetensorsReader(path)
    src = Source(reader, spec, device, method)
    stored = _stored_lm_head(src)
    if stored == "nvfp4" and lm_head not in (None, "nvfp4"):
        raise CheckpointError(f"adallm: {path} stores lm_head in NVFP4; it loads as stored (lm_head=None or "
                              f"'nvfp4'), not as lm_head={lm_head!r} (that needs a checkpoint with a dense lm_head)")
    model = _skeleton(config, dtype)
    patch(model, lm_head=stored, method=method, quantize=False)

    quantized = fill_nvfp4_modules(model, src, progress)
    _fill_rest(model, src, quantized)
    if lm_head is not None and lm_head != stored:
        set_lm_head(model, lm_head, method=method)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"adallm: {path}: {len(leftover)} tensors of the model were not found in the "
                              f"checkpoint, e.g. {leftover[:3]}")
    model.to(device)
    model.config.name_or_path = name_or_path
    return model


def fill_nvfp4_modules(model: nn.Module, src: Source, progress: bool = True) -> list[str]:
    """Fills every NVFP4 module of a patched model from `src`, layer by layer; records activation and KV
    scales in model.adallm_extra_tensors. Returns the module paths filled."""
    from tqdm.auto import tqdm
    extras: dict[str, torch.Tensor] = {}
    targets = [(p, m) for p, m in model.named_modules() if isinstance(m, NVFP4Linear) or _is_experts(m)]
    what = f"loading {src.spec.format} {src.spec.quant_algo}" if src.spec else "quantizing to NVFP4"
    for path, mod in tqdm(targets, desc=f"adallm: {what}", unit="module", disable=not progress):
        if _is_experts(mod):
            _fill_experts(mod, path, src, extras)
            continue
        new = _fill_linear(mod, path, src, extras)
        if new is not mod:
            parent, child = path.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, new)
    if src.quantized_on_load:
        warnings.warn(f"adallm: {src.reader.directory}: {len(src.quantized_on_load)} decoder projections are excluded "
                      f"from quantization in this checkpoint (stored unquantized), e.g. {src.quantized_on_load[0]}; "
                      f"AdaLLM runs them in NVFP4, so they were quantized on load", stacklevel=3)
    for name in src.reader.keys():
        if name.endswith((".k_scale", ".v_scale")):
            extras[name] = src.reader.get(name).float().reshape(())
    model.adallm_extra_tensors = extras
    return [p for p, _ in targets]


def _fill_rest(model: nn.Module, src: Source, quantized: list[str]) -> None:
    """Everything that is not an NVFP4 module: embeddings, norms, routers, excluded projections."""
    tied = _tied_targets(model)
    inside = tuple(p + "." for p in quantized)
    for path, module in model.named_modules():
        if path.startswith(inside) or path in quantized:
            continue
        names = [(n, t) for n, t in module._parameters.items() if t is not None]
        names += [(n, t) for n, t in module._buffers.items()
                  if t is not None and n not in module._non_persistent_buffers_set]
        for n, t in names:
            full = f"{path}.{n}" if path else n
            if full in tied and not src.has(full):
                continue
            if not src.has(full) and t.device.type != "meta":
                continue  # a buffer the module computed itself
            st_dtypes = ("BF16", "F16", "F32") if t.is_floating_point() else "*"
            _set(module, n, src.get(full, tuple(t.shape), st_dtypes, "unquantized tensor").to(t.dtype))
    for target, source in tied.items():
        owner, n = target.rsplit(".", 1)
        mod = model.get_submodule(owner)
        if n in mod._parameters and mod._parameters[n].device.type == "meta":
            mod._parameters[n] = model.get_parameter(source)


# --------------------------------------------------------------------------------------------------
# save_pretrained (ModelOpt layout)


def _nvfp4_tensors(model: nn.Module, extras: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per-projection ModelOpt tensors of every NVFP4 module; also returns the module paths covered."""
    out: dict[str, torch.Tensor] = {}
    paths: list[str] = []

    def put(prefix: str, w: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> None:
        t = modelopt.tensor_names(prefix)
        out[t["weight"]], out[t["scale"]], out[t["global"]] = w, s, g.float().reshape(())
        if t["input"] in extras:
            out[t["input"]] = extras[t["input"]].float().reshape(())

    for path, mod in model.named_modules():
        if path.startswith(tuple(p + "." for p in paths)):
            continue
        if isinstance(mod, (NVFP4Linear, SeparateParts)):
            parent = path.rsplit(".", 1)[0]
            prefixes = [f"{parent}.{p}" for p in mod.parts] if mod.parts else [path]
            if isinstance(mod, SeparateParts):
                pieces = [(lin.weight, lin.weight_scale, lin.weight_global_scale) for lin in mod.linears]
                out.update({f"{p}.bias": lin.bias for p, lin in zip(prefixes, mod.linears) if lin.bias is not None})
            else:
                sizes = list(mod.part_sizes) if mod.parts else [mod.out_features]
                pieces = [(w, s, mod.weight_global_scale) for w, s in
                          zip(mod.weight.split(sizes), mod.weight_scale.split(sizes))]
                if mod.bias is not None:
                    out.update({f"{p}.bias": b for p, b in zip(prefixes, mod.bias.split(sizes))})
            for p, piece in zip(prefixes, pieces):
                put(p, *piece)
        elif _is_experts(mod):
            inter = mod.gate_up_weight.shape[1] // 2
            for e in range(mod.gate_up_weight.shape[0]):
                g = mod.gate_up_weight_global_scale[e]
                put(f"{path}.{e}.gate_proj", mod.gate_up_weight[e, :inter], mod.gate_up_weight_scale[e, :inter], g)
                put(f"{path}.{e}.up_proj", mod.gate_up_weight[e, inter:], mod.gate_up_weight_scale[e, inter:], g)
                put(f"{path}.{e}.down_proj", mod.down_weight[e], mod.down_weight_scale[e],
                    mod.down_weight_global_scale[e])
        else:
            continue
        paths.append(path)
    return out, paths


def _exclude_patterns(model: nn.Module, quantized: list[str]) -> list[str]:
    """ModelOpt exclude_modules for the projections written in BF16 (2-D `weight`, not an embedding; an FP8
    lm_head, written dense): each is named by its largest enclosing module that holds no NVFP4 module
    ("model.vision_tower*"), or itself."""
    qs = tuple(quantized)
    has_q = lambda p: any(q == p or q.startswith(p + ".") for q in qs)  # noqa: E731
    out: list[str] = []
    for path, mod in model.named_modules():
        w = (mod.weight if isinstance(mod, FP8Linear) else mod._parameters.get("weight")) if path else None
        if w is None or w.dim() != 2 or isinstance(mod, nn.Embedding) or path.startswith(qs):
            continue
        atoms = path.split(".")
        root = next(".".join(atoms[:i]) for i in range(1, len(atoms) + 1) if not has_q(".".join(atoms[:i])))
        pat = root if root == path else root + "*"
        if pat not in out and not modelopt.is_excluded(path, out):
            out.append(pat)
    return out


def save_pretrained(model: nn.Module, save_directory: str, tokenizer=None, max_shard_size: int | str = "5GB") -> None:
    """Writes an AdaLLM-patched model as a ModelOpt NVFP4 checkpoint that from_pretrained reads back
    bit-identically (and vLLM's ModelOpt loader reads).

    Files: config.json (with quantization_config, quant_method "modelopt"), hf_quant_config.json,
    model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json, the generation
    config, and the tokenizer if given. Each fused group is written as its per-projection tensors (weight,
    weight_scale, weight_scale_2 = the group's global), MoE experts per expert; input_scale / k_scale /
    v_scale that came with a loaded checkpoint are written back. quant_algo is "NVFP4" when every
    projection has its activation scale, else "W4A16_NVFP4" (weight-only: AdaLLM computes in BF16 and has
    no calibrated activation scales to offer a W4A4 runtime).
    An FP8 lm_head (the format has no per-row FP8 weight-only entry) is written like a dense one: lm_head.weight
    dequantized to the model's dtype, listed in exclude_modules; where the config ties lm_head to the embedding,
    nothing is written for it. from_pretrained(..., lm_head="fp8") quantizes that dense head (or the embedding)
    again: for a bf16/fp16 model, the same codes and scales.
    """
    extras = getattr(model, "adallm_extra_tensors", {})
    tensors, quantized = _nvfp4_tensors(model, extras)
    if not quantized:
        raise ValueError("adallm: save_pretrained needs a model with NVFP4 modules (adallm.patch or "
                         "adallm.from_pretrained); this one has none")
    tied = _tied_targets(model)
    fp8 = [p for p, m in model.named_modules() if isinstance(m, FP8Linear)]
    inside = tuple(p + "." for p in quantized + fp8)
    for name, t in model.state_dict().items():
        if not name.startswith(inside) and name not in tied:
            tensors[name] = t
    if not _ties_embeddings(model):  # FP8Linear is only ever the lm_head: written dense, or not at all when tied
        tensors.update({f"{p}.weight": model.get_submodule(p).dequantize(model.dtype) for p in fp8})
    kv = {k: v for k, v in extras.items() if k.endswith((".k_scale", ".v_scale"))}
    tensors.update({k: v.float().reshape(()) for k, v in kv.items()})
    has_input = all(k.replace(".weight_scale_2", ".input_scale") in tensors
                    for k in tensors if k.endswith(".weight_scale_2"))
    algo = "NVFP4" if has_input else "W4A16_NVFP4"
    hf_quant = modelopt.hf_quant_config(algo, _exclude_patterns(model, quantized), "FP8" if kv else None,
                                        _version())
    os.makedirs(save_directory, exist_ok=True)
    write_sharded(tensors, save_directory, max_shard_size)
    cfg = copy.deepcopy(model.config)
    cfg.quantization_config = {"quant_method": modelopt.NAME, **hf_quant}
    cfg.architectures = cfg.architectures or [type(model).__name__]
    cfg.save_pretrained(save_directory)
    with open(os.path.join(save_directory, "hf_quant_config.json"), "w") as f:
        json.dump(hf_quant, f, indent=2)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(save_directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("adallm")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# info

_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "I16": 2, "F32": 4,
             "I32": 4, "F64": 8, "I64": 8}


def info(name_or_path: str, revision: str | None = None) -> dict:
    """What a checkpoint holds, from its configs and safetensors headers (no tensor data is read)."""
    path = resolve(name_or_path, revision)
    config, raw = read_config(path)
    spec = detect_quantization(raw, path)
    reader = SafetensorsReader(path)
    metas = {k: reader.meta(k) for k in reader.keys()}
    nbytes = {k: _ITEMSIZE.get(d, 0) * int(torch.Size(s).numel()) for k, (s, d) in metas.items()}
    quantized: list[str] = []
    if spec is not None:
        fmt = FORMATS[spec.format]
        quantized = sorted(k[: -len(fmt.WEIGHT) - 1] for k in metas
                           if k.endswith("." + fmt.WEIGHT) and k[: -len(fmt.WEIGHT)] + fmt.SCALE in metas)
    qset = set(quantized)
    owner = lambda k: k.rsplit(".", 1)[0]  # noqa: E731
    q_bytes = sum(b for k, b in nbytes.items() if owner(k) in qset)
    q_params = sum(metas[f"{p}.{FORMATS[spec.format].WEIGHT}"][0][0] * metas[f"{p}.{FORMATS[spec.format].WEIGHT}"][0][1]
                   * 2 for p in quantized) if quantized else 0
    dense = sorted(owner(k) for k, (s, d) in metas.items()
                   if k.endswith(".weight") and len(s) == 2 and d in ("BF16", "F16", "F32") and owner(k) not in qset)
    text = config.get_text_config()
    return {
        "path": path,
        "architectures": raw.get("architectures"),
        "model_type": raw.get("model_type"),
        "layers": getattr(text, "num_hidden_layers", None),
        "experts": getattr(text, "num_experts", None),
        "format": spec.format if spec else "unquantized",
        "quant_algo": spec.quant_algo if spec else None,
        "kv_cache_quant_algo": spec.kv_cache_quant_algo if spec else None,
        "excluded_by_config": spec.exclude if spec else [],
        "files": len(set(reader.weight_map.values())),
        "tensors": len(metas),
        "nvfp4_projections": len(quantized),
        "nvfp4_params": q_params,
        "unquantized_matrices": dense,
        "kv_scales": sum(k.endswith((".k_scale", ".v_scale")) for k in metas),
        "bytes_total": sum(nbytes.values()),
        "bytes_nvfp4": q_bytes,
        "bytes_unquantized": sum(nbytes.values()) - q_bytes,
        "bytes_nvfp4_as_bf16": q_params * 2,
    }
