"""NVFP4MLP's one-row path: gate/up GEMV and activation as one op (adallm::nvfp4_linear_glu), against the
two-step path (GEMV, then act * up) on the same module, for the two families' activations; and the activation probe."""
import pytest
import torch
import torch.nn.functional as F
from integration_common import tiny_model
from transformers.activations import ACT2FN

import adallm
from adallm.mlp import NVFP4MLP, glu_activation


@pytest.mark.parametrize("family,act", [("qwen3", "silu"), ("gemma3", "gelu_tanh")])
def test_one_row_matches_two_step_path(family, act):
    model = adallm.patch(tiny_model(family), progress=False)
    mlp = next(m for m in model.modules() if isinstance(m, NVFP4MLP))
    assert mlp.glu_activation == act
    x = torch.randn(2, mlp.gate_up_proj.in_features, dtype=next(model.parameters()).dtype)
    rows = mlp(x)  # two rows: the two-step path
    for i in range(2):
        one = mlp(x[i:i + 1])  # the fused op
        torch.testing.assert_close(one.float(), rows[i:i + 1].float(), rtol=2e-2, atol=2e-2 * rows.abs().max().item())


def test_activation_probe():
    assert glu_activation(ACT2FN["silu"]) == "silu"
    assert glu_activation(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert glu_activation(F.gelu) is None  # exact GELU: not the tanh form, so the two-step path
    assert glu_activation(torch.relu) is None
