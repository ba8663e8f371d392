"""Replayable augmented views: the paper's train augmentation as explicit parameters, drawn from a
generator keyed by (view seed, image, k), and one function that renders a view at any size and
normalisation. The teacher (at its input size, with its own mean/std) and the student (at its size,
with its statistics) thus see the same view, and the cache can store the teacher's embedding of it."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from vl2v.data import load_rgb

log = logging.getLogger(__name__)

# The paper's train augmentation (vl2v.data.build_train_transform).
CROP_SCALE, CROP_RATIO = (0.7, 1.0), (3 / 4, 4 / 3)
JITTER = 0.3  # brightness, contrast, saturation and hue strength
GRAYSCALE_P = 0.1
N_PARAMS = 14  # length of ViewParams.to_array()
# torchvision draws from torch's global generator: threads drawing views at once (a teacher
# server's client renders views in its request threads) take turns, or they would reseed each other.
_DRAWING = threading.Lock()


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
    with _DRAWING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(Image.new("L", (width, height)), list(CROP_SCALE), list(CROP_RATIO))
        flip = bool(torch.rand(1) < 0.5)
        jitter = [max(0.0, 1 - JITTER), 1 + JITTER]
        order, b, c, s, hue = T.ColorJitter.get_params(jitter, jitter, jitter, [-JITTER, JITTER])
        gray = bool(torch.rand(1) < GRAYSCALE_P)
    return ViewParams(top / height, left / width, h / height, w / width, flip, float(b), float(c), float(s), float(hue),
                      tuple(int(i) for i in order), gray)


def render_view_image(image: Image.Image, view: ViewParams, size: int | tuple[int, int]) -> Image.Image:
    """The view of an RGB image at `size` (an int: square; else (height, width)), as an 8-bit RGB image:
    what a teacher server is sent (losslessly, as PNG) and what `render_view` normalises."""
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
    return img


def render_view(image: Image.Image, view: ViewParams, size: int | tuple[int, int], mean, std) -> torch.Tensor:
    """The view of an RGB image at `size`, normalised with (mean, std): [3, H, W] float32."""
    return TF.normalize(TF.to_tensor(render_view_image(image, view, size)), list(mean), list(std))


def draw_views(key: str, image_size: tuple[int, int], seed: int, ks: range) -> np.ndarray:
    """[len(ks), N_PARAMS] parameters of views k in `ks` of one image."""
    return np.stack([draw_view(image_size, view_seed(seed, key, k)).to_array() for k in ks]) if len(ks) else np.zeros((0, N_PARAMS))


def stored_views(key: str, image_size: tuple[int, int], seed: int, ks: range) -> np.ndarray:
    """[len(ks), N_PARAMS] float32: the parameters of views `ks` as a cache stores them. Views are
    rendered from these rounded values, for the teacher as for the student, so both see one view."""
    return draw_views(key, image_size, seed, ks).astype(np.float32)


class DrawnViews:
    """Views k in `ks` of each image, drawn from (seed, its relative path, k): what the teacher embeds."""

    def __init__(self, seed: int, ks: range):
        self.seed, self.ks = seed, ks

    @property
    def count(self) -> int:
        return len(self.ks)

    def __call__(self, i: int, key: str, image: Image.Image) -> np.ndarray:
        return stored_views(key, image.size, self.seed, self.ks)


class ViewImages(Dataset):
    """Item i: the views of `root/paths[i]` rendered at `size` with (mean, std), their parameters and
    whether the file decoded: ([K, 3, H, W] float32, [K, N_PARAMS] float32, bool). `views(i, path,
    image)` gives the parameters (`DrawnViews`, or ones a cache stored); a file that fails to decode
    gives zeros."""

    def __init__(self, root: Path, paths: list[str], views, size: tuple[int, int], mean, std):
        self.root, self.paths, self.views = Path(root), paths, views
        self.size, self.mean, self.std = tuple(size), tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.root / self.paths[i])
        except (OSError, SyntaxError, ValueError) as e:
            log.warning("cannot decode %s: %s", self.paths[i], e)
            k = self.views.count
            return torch.zeros(k, 3, *self.size), torch.zeros(k, N_PARAMS), False
        params = self.views(i, self.paths[i], image)
        rendered = [render_view(image, ViewParams.from_array(p), self.size, self.mean, self.std) for p in params]
        return torch.stack(rendered), torch.from_numpy(np.asarray(params, dtype=np.float32)), True
