"""Replayable views: the paper's augmentation as explicit parameters, rendered at any size."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from vl2v.data import build_train_transform
from vl2v.views import N_PARAMS, ViewParams, draw_view, draw_views, render_view, view_seed

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def photo(w: int = 37, h: int = 29, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("seed", range(8))
def test_a_drawn_view_is_exactly_torchvisions_train_augmentation(seed):
    img = photo(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expected = build_train_transform(24, MEAN, STD)(img)
    view = draw_view(img.size, seed)
    assert torch.allclose(render_view(img, view, 24, MEAN, STD), expected, atol=1e-6)


def test_parameters_round_trip_and_are_keyed_by_seed_image_and_k():
    view = draw_view((40, 30), view_seed(0, "a/b/c.png", 3))
    assert ViewParams.from_array(view.to_array()) == view and view.to_array().shape == (N_PARAMS,)
    stored = ViewParams.from_array(view.to_array().astype(np.float32))  # as a cache keeps them
    img = photo(40, 30)
    assert torch.equal(render_view(img, stored, 24, MEAN, STD), render_view(img, view, 24, MEAN, STD))
    seeds = {view_seed(s, key, k) for s in (0, 1) for key in ("a/x.png", "b/x.png") for k in range(3)}
    assert len(seeds) == 12  # the same file name in another folder is another image
    many = draw_views("a/x.png", (40, 30), 0, range(2, 5))
    assert many.shape == (3, N_PARAMS) and np.array_equal(many[0], draw_view((40, 30), view_seed(0, "a/x.png", 2)).to_array())
    assert 0.7 * 0.99 <= view.height * view.width <= 1.0 + 1e-9


def test_the_same_view_at_the_same_size_is_pixel_identical_for_teacher_and_student():
    img = photo(64, 48)
    view = draw_view(img.size, 7)
    teacher = render_view(img, view, 32, MEAN, STD) * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    student = render_view(img, view, 32, (0.0,) * 3, (1.0,) * 3)
    assert torch.allclose(teacher, student, atol=1e-6)
    y, x = np.mgrid[0:48, 0:64]
    smooth = Image.fromarray(np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8))  # resampling keeps it
    small, large = render_view(smooth, view, 16, MEAN, STD), render_view(smooth, view, 64, MEAN, STD)
    shrunk = torch.nn.functional.interpolate(large[None], size=16, mode="area")[0]
    assert small.shape == (3, 16, 16) and (small - shrunk).abs().mean() < 0.05  # the same region at another size


def test_views_drawn_in_threads_at_once_are_the_views_drawn_alone():
    """torchvision draws from torch's global generator; a teacher server's client draws in threads."""
    alone = [draw_view((40, 30), seed) for seed in range(64)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda seed: draw_view((40, 30), seed), range(64))) == alone
