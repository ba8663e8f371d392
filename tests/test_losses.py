"""`adip_loss` against hand-computed numbers: λ·(−cos(s, t_img)) + (1−λ)·(−cos(s, t_txt)), batch mean."""

from __future__ import annotations

import math

import pytest
import torch

from vl2v.losses import adip_loss

R2 = 1 / math.sqrt(2)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# (student, image target, text target, cos(s, t_img), cos(s, t_txt)) in 2-D, cosines known exactly
CASES = [
    ((1, 0), (1, 0), (0, 1), 1.0, 0.0),
    ((1, 0), (-1, 0), (1, 0), -1.0, 1.0),
    ((1, 1), (1, 0), (-1, -1), R2, -1.0),
    ((0, 3), (1, 1), (0, -2), R2, -1.0),
    ((2, 0), (0, -5), (3, 3), 0.0, R2),
]


@pytest.mark.parametrize("lmd", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("s, ti, tt, cos_i, cos_t", CASES)
def test_single_sample_matches_hand_computed(s, ti, tt, cos_i, cos_t, lmd):
    loss = adip_loss(t(s), t(ti), t(tt), lmd)
    assert loss.shape == ()
    assert float(loss) == pytest.approx(-(lmd * cos_i + (1 - lmd) * cos_t), abs=1e-12)


def test_explicit_values():
    s, ti, tt = t((1, 1)), t((1, 0)), t((-1, -1))  # cos 1/√2 and −1
    assert float(adip_loss(s, ti, tt, 0.0)) == pytest.approx(1.0)
    assert float(adip_loss(s, ti, tt, 1.0)) == pytest.approx(-R2)
    assert float(adip_loss(s, ti, tt, 0.5)) == pytest.approx(0.5 - 0.5 * R2)
    assert float(adip_loss(s, ti, tt)) == pytest.approx(0.5 - 0.5 * R2)  # λ defaults to 0.5 (the paper)
    assert float(adip_loss(t((1, 0)), t((1, 0)), t((1, 0)))) == pytest.approx(-1.0)  # the minimum


@pytest.mark.parametrize("lmd", [0.0, 0.5, 1.0])
def test_batch_is_the_mean_of_samples(lmd):
    students = t(*[c[0] for c in CASES])
    images = t(*[c[1] for c in CASES])
    texts = t(*[c[2] for c in CASES])
    expected = sum(-(lmd * c[3] + (1 - lmd) * c[4]) for c in CASES) / len(CASES)
    assert float(adip_loss(students, images, texts, lmd)) == pytest.approx(expected, abs=1e-12)


def test_invariant_to_student_scale():
    g = torch.Generator().manual_seed(0)
    s, ti, tt = (torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(3))
    base = adip_loss(s, ti, tt)
    scales = torch.tensor([0.01, 0.3, 1.0, 7.0, 1e3, 1.0, 2.0], dtype=torch.float64)[:6, None]
    for scaled in (s * 1e-3, s * 42.0, s * scales):  # one scale for all, and one per sample
        assert torch.allclose(adip_loss(scaled, ti, tt), base, atol=1e-12)
    assert not torch.allclose(adip_loss(-s, ti, tt), base)  # sign matters, only the norm does not


def test_gradient_is_orthogonal_to_the_student_vector():
    """Scale invariance means no gradient along s itself: the loss only turns the vector."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ti, tt = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    adip_loss(s, ti, tt).backward()
    assert s.grad.abs().sum() > 0
    assert torch.allclose((s.grad * s.detach()).sum(1), torch.zeros(4, dtype=torch.float64), atol=1e-12)
