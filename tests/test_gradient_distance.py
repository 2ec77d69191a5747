import math

import pytest
import torch

from fastdd.distill.gradient_distance import gradient_distance, layerwise_cosine_distance


def test_layerwise_distance_hand_computed():
    g_syn = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1.0, 2.0])]
    g_real = [torch.tensor([[3.0, 0.0], [1.0, 0.0]]), torch.tensor([5.0, -7.0])]
    # row 0: cos = 3 / (1 * 3 + 1e-6); row 1: orthogonal, cos = 0; the bias (1-D) contributes nothing.
    expected = (1 - 3 / (3 + 1e-6)) + 1.0
    assert math.isclose(float(gradient_distance(g_syn, g_real, "ours")), expected, rel_tol=1e-6)


def test_conv_gradient_rows_are_output_channels():
    g = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    g[0, 0, 0, 0] = 1.0
    g[1, 0, 1, 1] = 1.0
    h = g.clone()
    h[1] = -h[1]  # opposite direction for output channel 1: 1 - (-1) = 2
    value = float(layerwise_cosine_distance(g, h))
    assert math.isclose(value, (1 - 1 / (1 + 1e-6)) + (1 + 1 / (1 + 1e-6)), rel_tol=1e-12)


def test_mse_and_cos_hand_computed():
    a = [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]
    b = [torch.tensor([[0.0, 2.0]]), torch.tensor([1.0])]
    assert math.isclose(float(gradient_distance(a, b, "mse")), 1.0 + 4.0)
    dot, na, nb = 0 + 4 + 3, math.sqrt(1 + 4 + 9), math.sqrt(0 + 4 + 1)
    assert math.isclose(float(gradient_distance(a, b, "cos")), 1 - dot / (na * nb + 1e-6), rel_tol=1e-6)


def test_distance_is_differentiable_and_zero_at_match():
    g = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradient_distance([g], [g.detach()], "ours").item() < 1e-5
    torch.autograd.gradcheck(lambda x: gradient_distance([x], [torch.ones_like(x)], "ours"), (g,))


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown gradient distance"):
        gradient_distance([torch.ones(2, 2)], [torch.ones(2, 2)], "l1")
    with pytest.raises(ValueError, match="shapes differ"):
        gradient_distance([torch.ones(2, 2)], [torch.ones(2, 3)])
