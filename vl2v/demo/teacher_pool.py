"""What the demo CLIP learns from: image-caption batches drawn from the teacher pool.

The pool (see `digits.teacher_images`) holds teacher-pool MNIST and UCI digits, font-rendered digits
and photo patches; MNIST-M-style images are blended on the fly from teacher digits and teacher
photos. Captions vary their phrasing, as web alt-text would, so the teacher learns the class words
rather than one template.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from vl2v.demo import digits, sources

# Phrasings for any kind of image; {w} is the class word, {n} the numeral.
GENERIC_TEMPLATES = (
    "a photo of a {w}", "a photo of the digit {w}", "a photo of the number {n}", "the number {n}",
    "the digit {w}", "a picture of a {w}", "an image of the number {w}", "a close-up of a {n}",
    "{w}", "{n}", "a {w}", "number {w}",
)  # fmt: skip
# Phrasings that describe how a kind of image looks.
KIND_TEMPLATES = {
    "mnist": ("a handwritten {w}", "a handwritten digit {n}", "a scan of a handwritten {w}",
              "a black and white photo of a handwritten {w}"),
    "mnist_m": ("a handwritten {w} on a photo", "a colourful photo of a handwritten {w}",
                "the digit {n} drawn over a picture"),
    "synth": ("a printed {w}", "the digit {n} in a computer font", "a typed {w}",
              "a {w} in colour"),
    "uci": ("a blurry handwritten {w}", "a low resolution scan of a {w}", "a pixelated {n}"),
}  # fmt: skip
KINDS = tuple(KIND_TEMPLATES)


def captions(kind: str) -> list[list[str]]:
    """All captions of a kind of image. Returns `[10][T]` strings, row = class."""
    templates = GENERIC_TEMPLATES + KIND_TEMPLATES[kind]
    return [[t.format(w=w, n=n) for t in templates] for n, w in enumerate(sources.CLASS_WORDS)]


class TeacherBatches:
    """Random image-caption batches from the teacher pool, as model-ready tensors.

    `tokenizer` is the teacher's; `mean`/`std` its preprocessing. The demo images are already the
    model's 32x32 input size, so the teacher's own preprocessing reduces to scaling to [0, 1] and
    normalising with its mean and std (tests check that against open_clip's transform)."""

    def __init__(
        self,
        tokenizer: Callable[[list[str]], torch.Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        mix: dict[str, float],
        n_synth: int,
        n_patches: int,
        colourize: float,
        seed: int,
        synth_grey: float = 0.0,
    ) -> None:
        unknown = set(mix) - set(KINDS)
        if unknown:
            raise ValueError(f"Unknown kinds {sorted(unknown)} in mix. Choose from: {KINDS}.")
        pool = digits.teacher_images(seed, n_synth, synth_grey)
        self.images = {k: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for k, (x, _) in
                       pool.items()}  # fmt: skip
        self.labels = {k: torch.from_numpy(y) for k, (_, y) in pool.items()}
        patches = digits.teacher_patches(seed, n_patches)
        self.patches = torch.from_numpy(patches).permute(0, 3, 1, 2).contiguous()
        self.tokens = {k: torch.stack([tokenizer(row) for row in captions(k)]) for k in mix}
        self.kinds = list(mix)
        self.weights = torch.tensor([mix[k] for k in self.kinds], dtype=torch.float64)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.colourize = colourize
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """Distinct real images in the pool (blends and augmentation add more)."""
        return sum(len(x) for x in self.images.values())

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns images `[B, 3, 32, 32]` (normalised), caption tokens `[B, context_length]` and
        the digit of each pair `[B]`."""
        g = self.gen
        kind_of = torch.multinomial(self.weights, batch_size, replacement=True, generator=g)
        images, tokens, labels = [], [], []
        for i, kind in enumerate(self.kinds):
            n = int((kind_of == i).sum())
            if n == 0:
                continue
            x, y = self._images(kind, n)
            table = self.tokens[kind]  # [10, T, L]
            t = torch.randint(table.shape[1], (n,), generator=g)
            images.append(x)
            tokens.append(table[y, t])
            labels.append(y)
        x = random_affine(torch.cat(images), g)
        x = self.normalize(x)
        # Shuffle so a batch is not sorted by kind (the loss does not care; BatchNorm-free model).
        perm = torch.randperm(batch_size, generator=g)
        return x[perm], torch.cat(tokens)[perm], torch.cat(labels)[perm]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 32, 32] in [0, 1] -> the teacher's input (its mean and std)."""
        return (x - self.mean) / self.std

    def _images(self, kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` random images of a kind in [0, 1] and their labels."""
        g = self.gen
        source = "mnist" if kind == "mnist_m" else kind
        idx = torch.randint(len(self.labels[source]), (n,), generator=g)
        x, y = self.images[source][idx].float() / 255, self.labels[source][idx]
        if kind == "mnist_m":
            patch = self.patches[torch.randint(len(self.patches), (n,), generator=g)].float() / 255
            x = (patch - x).abs()  # MNIST-M's blend, as in sources.blend_mnist_m
        elif kind in ("mnist", "uci") and self.colourize > 0:
            x = _colourize(x, self.colourize, g)
        return x, y


def _colourize(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """With probability `p` per image, map a grey digit's black..white to random bg..fg colours,
    so the teacher does not tie digits to grey (the demo's synth and mnist_m are colourful)."""
    n = x.shape[0]
    bg, fg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    coloured = bg + (fg - bg) * x[:, :1]
    keep = (torch.rand(n, 1, 1, 1, generator=g) >= p).float()
    return keep * x + (1 - keep) * coloured


def random_affine(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild per-image rotation (±10°), scale (±10%) and shift (±2 px), edges replicated."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * 2 / x.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # fmt: skip
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)
