"""Replayable augmented views: the paper's train augmentation as explicit parameters, drawn from a
generator keyed by (view seed, image, k), and one function that renders a view at any size and
normalisation. The teacher (at its input size, with its own mean/std) and the student (at its size,
with its statistics) thus see the same view, and the cache can store the teacher's embedding of it."""

from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

# The paper's train augmentation (vl2v.data.build_train_transform).
CROP_SCALE, CROP_RATIO = (0.7, 1.0), (3 / 4, 4 / 3)
JITTER = 0.3  # brightness, contrast, saturation and hue strength
GRAYSCALE_P = 0.1
N_PARAMS = 14  # length of ViewParams.to_array()


@dataclass(frozen=True)
class ViewParams:
    """One augmented view of an image. The crop is in the original image's relative coordinates, so it
    renders the same region at any output size."""

    top: float
    left: float
    height: float
    width: float
    flip: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, int, int, int]  # the order the four jitter operations are applied in
    grayscale: bool

    def to_array(self) -> np.ndarray:
        *head, order, gray = astuple(self)
        return np.array([*head, *order, gray], dtype=np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> ViewParams:
        a = [float(x) for x in a]
        return cls(*a[:4], bool(a[4]), *a[5:9], tuple(int(round(x)) for x in a[9:13]), bool(a[13]))


def view_seed(seed: int, key: str, k: int) -> int:
    """A 63-bit seed from (view seed, image key, view index); the image key is its relative path."""
    digest = hashlib.sha256(f"{seed}\t{key}\t{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_view(image_size: tuple[int, int], seed: int) -> ViewParams:
    """The parameters torchvision's RandomResizedCrop, RandomHorizontalFlip, ColorJitter and
    RandomGrayscale would draw for an image of `image_size` (width, height), from `seed` alone."""
    width, height = image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(Image.new("L", (width, height)), list(CROP_SCALE), list(CROP_RATIO))
        flip = bool(torch.rand(1) < 0.5)
        jitter = [max(0.0, 1 - JITTER), 1 + JITTER]
        order, b, c, s, hue = T.ColorJitter.get_params(jitter, jitter, jitter, [-JITTER, JITTER])
        gray = bool(torch.rand(1) < GRAYSCALE_P)
    return ViewParams(top / height, left / width, h / height, w / width, flip, float(b), float(c), float(s), float(hue),
                      tuple(int(i) for i in order), gray)


def render_view(image: Image.Image, view: ViewParams, size: int | tuple[int, int], mean, std) -> torch.Tensor:
    """The view of an RGB image at `size`, normalised with (mean, std): [3, H, W] float32."""
    width, height = image.size
    out = (size, size) if isinstance(size, int) else tuple(size)
    top, left = int(round(view.top * height)), int(round(view.left * width))
    h, w = max(1, int(round(view.height * height))), max(1, int(round(view.width * width)))
    img = TF.resized_crop(image, top, left, h, w, list(out), antialias=True)
    if view.flip:
        img = TF.hflip(img)
    adjust = (
        lambda x: TF.adjust_brightness(x, view.brightness),
        lambda x: TF.adjust_contrast(x, view.contrast),
        lambda x: TF.adjust_saturation(x, view.saturation),
        lambda x: TF.adjust_hue(x, view.hue),
    )
    for i in view.order:
        img = adjust[i](img)
    if view.grayscale:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return TF.normalize(TF.to_tensor(img), list(mean), list(std))


def draw_views(key: str, image_size: tuple[int, int], seed: int, ks: range) -> np.ndarray:
    """[len(ks), N_PARAMS] parameters of views k in `ks` of one image."""
    return np.stack([draw_view(image_size, view_seed(seed, key, k)).to_array() for k in ks]) if len(ks) else np.zeros((0, N_PARAMS))
