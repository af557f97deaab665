"""How the CUDA kernel tests compare an op's output with a float64 reference (STYLE.md's rule), and poisoned outputs."""
import torch


def poison(numel: int, dtype: torch.dtype) -> None:
    """Leaves NaN-filled blocks of the output's size in the caching allocator: the op's output starts as NaN."""
    blocks = [torch.full((numel,), float("nan"), device="cuda", dtype=dtype) for _ in range(4)]
    del blocks


def check_close(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, abs_floor: float = 1e-6) -> None:
    """max |out - ref| <= 2 * max |plain - ref| + 1e-5 max |ref| + abs_floor, where plain is plain torch in out's dtype."""
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    err = (out.double() - ref64).abs().max().item()
    plain_err = (plain.double() - ref64).abs().max().item()
    floor = 1e-5 * ref64.abs().max().item() + abs_floor
    assert err <= 2 * plain_err + floor, f"error {err:.3e} vs plain torch {plain_err:.3e} (floor {floor:.1e})"
