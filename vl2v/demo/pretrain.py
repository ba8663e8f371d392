"""A pretrained student for the demo, as the paper's students start from ImageNet weights.

No ImageNet weights can be had offline, so the demo pretrains its student once, on a task of its own
that shares no image and no class with Digits-DG: telling apart 57 letters and symbols drawn in
matplotlib's fonts, white on black, in random colours, painted over or blended into patches of
skimage photos that no demo domain uses. The weights are saved as a timm state dict without the
classifier, so that `timm.create_model(name, pretrained=True, num_classes=0,
pretrained_cfg_overlay={"file": PATH, "num_classes": 0})` loads them, strictly
(`student_kwargs` gives that overlay; vl2v passes it as `model_kwargs`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from vl2v.demo import sources
from vl2v.demo.training import params_tag, read_params, warmup_cosine
from vl2v.demo.teacher_pool import random_affine
from vl2v.runtime import Progress, atomic_torch_save, atomic_write_json, seed_everything

log = logging.getLogger(__name__)

PRETRAIN_VERSION = 1  # bump when pretraining changes what a given recipe produces
# No digits, and none of the letters that are drawn like one (O, o, I, l); the cm* fonts draw
# '<', '>' and '$' as other glyphs, so those are left out too.
GLYPHS = tuple("ABCDEFGHJKLMNPQRSTUVWXYZ" "abcdefghijkmnpqrstuvwxyz" "+=?!#%&@*")
# Photos of neither the demo's MNIST-M backgrounds nor of text.
TEXTURES = (*sources.TEACHER_TEXTURES, "clock", "moon", "cell", "microaneurysms")
# Random streams of their own (digits.py numbers the demo's): the pretraining pool, its validation.
_STREAM, _VAL_STREAM = 3, 4


@dataclass(frozen=True)
class PretrainRecipe:
    """How the demo student is pretrained (defaults: the demo's, chosen by Align's validation)."""

    student: str = "resnet10t"
    glyphs: int = 4000  # rendered once; every step composes new views of them
    patches: int = 1000
    steps: int = 150
    batch_size: int = 128
    lr: float = 3e-3  # AdamW, warm-up + cosine
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    label_smoothing: float = 0.1


def student_kwargs(weights: Path) -> dict:
    """The timm `create_model` arguments that load pretrained `weights` (with `pretrained=True`)."""
    return {"pretrained_cfg_overlay": {"file": str(weights), "num_classes": 0}}


def _paths(out_dir: Path, params: dict) -> tuple[Path, Path]:
    """Weights and meta file, named after the student and the tag of their parameters."""
    weights = Path(out_dir) / f"{params['student']}-glyphs-{params_tag(params)}.pth"
    return weights, weights.with_suffix(".meta.json")


class GlyphBatches:
    """Random views of rendered glyphs: white on black, in two contrasting random colours, painted
    over a photo patch, or blended into one as MNIST-M blends digits; then a mild random affine."""

    def __init__(self, n_glyphs: int, n_patches: int, seed: int, stream: int = _STREAM):
        rng = np.random.default_rng([seed, stream])
        self.labels = torch.arange(n_glyphs) % len(GLYPHS)
        masks = [sources.render_glyph(rng, GLYPHS[y], colour=False)[..., 0]
                 for y in self.labels.tolist()]  # fmt: skip
        self.masks = torch.from_numpy(np.stack(masks))[:, None]  # [N, 1, 32, 32] uint8
        patches = [sources.random_patch(rng, TEXTURES, tint=True) for _ in range(n_patches)]
        self.patches = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).contiguous()
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns images `[B, 3, 32, 32]` in [0, 1] and glyph classes `[B]`."""
        g, n = self.gen, batch_size
        idx = torch.randint(len(self.labels), (n,), generator=g)
        mask = self.masks[idx].float() / 255
        patch = self.patches[torch.randint(len(self.patches), (n,), generator=g)].float() / 255
        light = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()  # a light or a dark ground
        bg = 0.55 * light + 0.45 * torch.rand(n, 3, 1, 1, generator=g)
        fg = 0.55 * (1 - light) + 0.45 * torch.rand(n, 3, 1, 1, generator=g)
        views = torch.stack([mask.expand(-1, 3, -1, -1), bg + (fg - bg) * mask,
                             patch + (fg - patch) * mask, (patch - mask).abs()])  # fmt: skip
        style = torch.randint(len(views), (n,), generator=g)
        x = views[style, torch.arange(n)]
        return random_affine(x, g), self.labels[idx]


def pretrain_demo_student(
    out_dir: Path,
    seed: int = 0,
    progress: Progress | None = None,
    recipe: PretrainRecipe = PretrainRecipe(),
) -> Path:
    """Pretrain `recipe.student` on the glyph task at 32 px and return its weights file (timm state
    dict, no classifier). Skipped when a run with the same parameters already wrote it."""
    params = {"version": PRETRAIN_VERSION, "seed": seed, **asdict(recipe)}
    weights, meta_json = _paths(out_dir, params)
    if weights.exists() and read_params(meta_json) == params:
        log.info("Demo student already pretrained: %s", weights)
        return weights
    seed_everything(seed)
    model = timm.create_model(recipe.student, pretrained=False, num_classes=len(GLYPHS))
    # The student's own input normalisation, as vl2v's training transforms apply it.
    cfg = timm.data.resolve_model_data_config(model)
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    t0 = time.perf_counter()
    batches = GlyphBatches(recipe.glyphs, recipe.patches, seed)
    log.info("Student pretraining pool: %d glyphs (%.1f s)", recipe.glyphs,
             time.perf_counter() - t0)  # fmt: skip
    stats = _train(model, batches, recipe, lambda x: (x - mean) / std, progress)
    val = GlyphBatches(len(GLYPHS) * 10, 200, seed, _VAL_STREAM)
    stats["val_acc"] = _accuracy(model, val, lambda x: (x - mean) / std)
    log.info("Student pretraining: %.1f%% of new glyph renderings right", 100 * stats["val_acc"])
    model.reset_classifier(0)  # a featurizer, as vl2v builds students (num_classes=0)
    atomic_torch_save(model.state_dict(), weights)
    atomic_write_json(meta_json, {"params": params, **stats})  # last: it marks the weights complete
    return weights


def _train(model, batches: GlyphBatches, recipe: PretrainRecipe, normalize,
           progress: Progress | None) -> dict:  # fmt: skip
    """Cross-entropy with label smoothing; AdamW with linear warm-up and cosine decay."""
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = warmup_cosine(opt, recipe.steps, recipe.warmup_frac)
    model.train()
    t0, losses = time.perf_counter(), []
    for s in range(recipe.steps):
        x, y = batches.sample(recipe.batch_size)
        loss = F.cross_entropy(model(normalize(x)), y, label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(s + 1, recipe.steps)
    model.eval()
    return {"train_seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(np.mean(losses[-20:])), 4)}  # fmt: skip


@torch.no_grad()
def _accuracy(model, batches: GlyphBatches, normalize, n: int = 1000) -> float:
    """Share of `n` fresh views classified right."""
    x, y = batches.sample(n)
    return float((model(normalize(x)).argmax(1) == y).float().mean())
