"""What the checkpoint readers share: the parsed quantization config and its errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and the problem."""


def unsupported(source: str, what: str, supported: str) -> CheckpointError:
    return CheckpointError(f"adallm: {source}: unsupported quantization: {what}; AdaLLM loads NVFP4 weights "
                           f"({supported})")


@dataclass
class QuantSpec:
    """A checkpoint's quantization config, whatever its on-disk dialect.

    format: "modelopt" or "compressed-tensors"; quant_algo: e.g. "NVFP4"; exclude: the format's own
    patterns for modules stored in BF16 (as written in the config; `info` shows them); kv_cache_quant_algo:
    "FP8" or None; excluded(name) -> True when the format's rules say module `name` is stored in BF16.
    """

    format: str
    quant_algo: str
    group_size: int
    exclude: list[str]
    kv_cache_quant_algo: str | None
    excluded: Callable[[str], bool] = field(repr=False, default=lambda name: False)

    def is_excluded(self, *names: str) -> bool:
        """True if any of the module's names (model and checkpoint spelling) is excluded."""
        return any(self.excluded(n) for n in names)
