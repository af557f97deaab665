"""Reading and writing (sharded) safetensors checkpoints, with errors that name the file and the tensor."""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .formats import CheckpointError

INDEX = "model.safetensors.index.json"


class SafetensorsReader:
    """Tensor name -> memory-mapped tensor over a directory's safetensors files.

    Uses `model.safetensors.index.json` when present (every shard it names must exist), else every
    `*.safetensors` file in the directory. Every file is opened (header parsed and checked against the
    file size) up front, so a truncated or corrupt shard fails before any weight is loaded.
    `get` returns a CPU tensor backed by the file mapping; nothing is read until it is used.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"adallm: {index}: no 'weight_map' in the index")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.exists(os.path.join(directory, name)):
                    held = [k for k, v in weight_map.items() if v == name]
                    raise CheckpointError(f"adallm: {index} names shard {name!r}, which is missing from {directory} "
                                          f"(it holds {len(held)} tensors, e.g. {held[0]!r}); download it again")
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"adallm: {directory}: no *.safetensors files (and no {INDEX})")
            weight_map = None
        self._handles = {name: self._open(name) for name in files}
        if weight_map is None:
            weight_map = {k: name for name, h in self._handles.items() for k in h.keys()}
        else:
            for name, h in self._handles.items():
                present = set(h.keys())
                lost = [k for k, v in weight_map.items() if v == name and k not in present]
                if lost:
                    raise CheckpointError(f"adallm: {self.path(name)}: the index says it holds {lost[0]!r} "
                                          f"({len(lost)} such tensors) but the file does not")
        self.weight_map: dict[str, str] = weight_map

    def path(self, file: str) -> str:
        return os.path.join(self.directory, file)

    def _open(self, file: str):
        try:
            return safe_open(self.path(file), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"adallm: {self.path(file)}: not a readable safetensors file ({e}); it is "
                                  f"truncated or corrupt, download it again") from e

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def where(self, name: str) -> str:
        """'file: tensor' for error messages."""
        return f"{self.path(self.weight_map[name])}: {name}" if name in self else f"{self.directory}: {name}"

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string such as 'U8', 'F8_E4M3', 'BF16') without reading the data."""
        sl = self._handles[self.weight_map[name]].get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self:
            raise CheckpointError(f"adallm: {self.directory}: tensor {name!r} is missing from the checkpoint")
        try:
            return self._handles[self.weight_map[name]].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"adallm: {self.where(name)}: cannot read the tensor ({e})") from e


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1234 -> bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_sharded(tensors: dict[str, torch.Tensor], directory: str, max_shard_size: int | str = "5GB",
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Writes tensors (any device; copied to CPU one shard at a time) as model.safetensors, or as
    model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json. Returns the file names."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, names in zip(files, shards):
        # clone: slices of one fused buffer share storage, which safetensors refuses to write.
        save_file({k: tensors[k].detach().to("cpu", copy=True).contiguous() for k in names},
                  os.path.join(directory, file), metadata={"format": "pt", **(metadata or {})})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: f for f, names in zip(files, shards) for k in names}}
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return files
