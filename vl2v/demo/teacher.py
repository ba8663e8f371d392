"""A small CLIP of our own for the offline demo, trained from scratch on the teacher pool.

No CLIP weights can be downloaded here, so the demo trains one: an open_clip architecture from a
JSON config (a ResNet image tower with attention pooling, CLIP's RN50 design at 32 px and width 16;
a 2-layer text tower with the bundled tokenizer), open_clip's own model, on digit images with varied
captions. The result is an ordinary open_clip teacher: `open_clip.add_model_config(config_json)`
registers it under the file's stem, and the weights are a plain state_dict
(`torch.load(..., weights_only=True)`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from vl2v.demo import digits, sources
from vl2v.demo.training import params_tag, read_params, warmup_cosine
from vl2v.demo.teacher_pool import TeacherBatches
from vl2v.runtime import Progress, atomic_torch_save, atomic_write_json, seed_everything

log = logging.getLogger(__name__)

MODEL_NAME = "vl2v-digits-clip"  # the config's file stem: the name open_clip registers it under
TEACHER_VERSION = 2  # bump when training changes what a given recipe produces
# A ViT image tower (32 px, patch 8, 4 layers of width 128) trained in the same time reached
# 70-75% zero-shot on the teacher's validation images, and collapsed at a learning rate of 2e-3 or
# with more colourful images in the mix; this ResNet (one bottleneck per stage) reaches ~95%.
MODEL_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TeacherRecipe:
    """How the demo teacher trains: a fixed number of steps, so it is the same on any machine.
    Chosen by zero-shot accuracy on the teacher's own validation images (`validation_accuracy`),
    never on the demo dataset."""

    steps: int = 500
    lr: float = 3e-3  # zero-shot on the validation images: 2e-3 and 4e-3 within a point of it
    weight_decay: float = 0.1
    batch_size: int = 128
    warmup_frac: float = 0.05
    mix: dict[str, float] = field(
        default_factory=lambda: {"mnist": 0.45, "mnist_m": 0.2, "synth": 0.2, "uci": 0.15}
    )
    n_synth: int = 5000  # font-rendered digits in the pool
    n_patches: int = 2000  # photo patches for MNIST-M-style blends
    colourize: float = 0.15  # share of grey digits given random colours
    synth_grey: float = 0.5  # share of font digits drawn white on black: colour alone stalls
    # A batch of 128 pairs holds ~13 of each digit. ClipLoss pushes each image away from the other
    # captions of its own digit as hard as from every other digit's; this share of every target
    # is spread over the pairs of the same digit instead (0: open_clip's ClipLoss).
    class_targets: float = 1.0
    # The 49,408-row token table is most of the model, yet the captions use ~60 of its rows: a
    # frozen (random) table saves a third of each step, and the text layers still learn.
    train_token_embedding: bool = False
    # CLIP's initial temperature (100/7) collapses every embedding to one point within ~10 steps
    # and a run this short never recovers; a cooler start avoids that, and a faster learning rate
    # on the logit scale lets it still grow to a CLIP-like sharpness.
    init_logit_scale: float = math.log(4)
    logit_scale_lr_mult: float = 10.0


def _paths(out_dir: Path, params: dict) -> tuple[Path, Path, Path]:
    """Config, weights and meta file. The config file's stem is the model's name; the weights
    carry the tag of their parameters (see `training.params_tag`)."""
    weights = Path(out_dir) / f"{MODEL_NAME}-{params_tag(params)}.pt"
    return Path(out_dir) / f"{MODEL_NAME}.json", weights, weights.with_suffix(".meta.json")


def create_demo_clip(config_json: Path) -> tuple[torch.nn.Module, object, object]:
    """Register the config and build (model, eval preprocess, tokenizer) with random weights."""
    open_clip.add_model_config(config_json)
    name = Path(config_json).stem
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model, preprocess, open_clip.get_tokenizer(name)


def load_demo_teacher(config_json: Path, weights_pt: Path) -> tuple[torch.nn.Module, object, object]:
    """(model in eval mode, preprocess, tokenizer) for a trained config+weights pair."""
    model, preprocess, tokenizer = create_demo_clip(config_json)
    model.load_state_dict(torch.load(weights_pt, map_location="cpu", weights_only=True))
    return model.eval(), preprocess, tokenizer


def train_demo_teacher(
    out_dir: Path,
    seed: int = 0,
    progress: Progress | None = None,
    recipe: TeacherRecipe = TeacherRecipe(),
) -> tuple[Path, Path]:
    """Train the demo CLIP for `recipe.steps` steps and return `(config_json, weights_pt)` in
    `out_dir`; the meta file beside them records the recipe, the final loss and the zero-shot
    accuracy on the teacher's validation images. Skipped when a run with the same parameters
    already wrote all three files."""
    params = {"version": TEACHER_VERSION, "seed": seed, "model": MODEL_CONFIG, **asdict(recipe)}
    config_json, weights_pt, meta_json = _paths(out_dir, params)
    if config_json.exists() and weights_pt.exists() and read_params(meta_json) == params:
        log.info("Demo teacher already trained: %s", weights_pt)
        return config_json, weights_pt
    atomic_write_json(config_json, MODEL_CONFIG)
    seed_everything(seed)
    model, _, tokenizer = create_demo_clip(config_json)
    with torch.no_grad():
        model.logit_scale.fill_(recipe.init_logit_scale)
    model.token_embedding.requires_grad_(recipe.train_token_embedding)
    pp = open_clip.get_model_preprocess_cfg(model)
    t0 = time.perf_counter()
    batches = TeacherBatches(tokenizer, pp["mean"], pp["std"], recipe.mix, recipe.n_synth,
                             recipe.n_patches, recipe.colourize, seed, recipe.synth_grey)  # fmt: skip
    log.info("Teacher pool: %d images (%.1f s)", len(batches), time.perf_counter() - t0)
    stats = _train(model, batches, recipe, progress)
    validation = validation_accuracy(model, tokenizer, batches.normalize)
    log.info("Teacher zero-shot on its validation images: %s",
             ", ".join(f"{k} {100 * v:.1f}%" for k, v in validation.items()))  # fmt: skip
    atomic_torch_save(model.state_dict(), weights_pt)
    # The meta file is written last: it is what marks the pair as complete.
    atomic_write_json(meta_json, {"params": params, **stats, "validation": validation})
    return config_json, weights_pt


def _optimizer(model: torch.nn.Module, recipe: TeacherRecipe) -> torch.optim.Optimizer:
    """AdamW; as in open_clip's training, no weight decay on gains, biases and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name == "logit_scale" or not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "ln" in name or "bias" in name
        (no_decay if exclude else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": [model.logit_scale], "weight_decay": 0.0,
               "lr": recipe.lr * recipe.logit_scale_lr_mult}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=recipe.lr)


def contrastive_loss(image_f: torch.Tensor, text_f: torch.Tensor, scale: torch.Tensor,
                     labels: torch.Tensor, class_targets: float) -> torch.Tensor:  # fmt: skip
    """CLIP's symmetric cross-entropy over the batch's image-text similarities ([B, D] each,
    L2-normalised; labels [B]), with `class_targets` of each row's target spread evenly over the
    pairs of the same class. At 0 it is open_clip's `ClipLoss`."""
    logits = scale * image_f @ text_f.T
    same = (labels[:, None] == labels[None, :]).float()
    target = (1 - class_targets) * torch.eye(len(labels)) + class_targets * same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2


def _train(model, batches: TeacherBatches, recipe: TeacherRecipe, progress: Progress | None) -> dict:
    """`recipe.steps` steps of the contrastive loss. Returns what the meta file records."""
    steps = recipe.steps
    opt = _optimizer(model, recipe)
    sched = warmup_cosine(opt, steps, recipe.warmup_frac)
    model.train()
    t0, losses = time.perf_counter(), []
    for s in range(steps):
        images, tokens, labels = batches.sample(recipe.batch_size)
        image_f, text_f, scale = model(images, tokens)
        loss = contrastive_loss(image_f, text_f, scale, labels, recipe.class_targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP caps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (s + 1) % max(1, steps // 10) == 0 or s + 1 == steps:
            log.info("teacher step %d/%d loss %.3f (%.0f s)", s + 1, steps,
                     sum(losses[-20:]) / len(losses[-20:]), time.perf_counter() - t0)  # fmt: skip
        if progress:
            progress(s + 1, steps)
    model.eval()
    return {"steps": steps, "train_seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "logit_scale": round(float(model.logit_scale.detach().exp()), 2)}  # fmt: skip


@torch.no_grad()
def validation_accuracy(model, tokenizer, normalize, template: str = "a photo of a {}") -> dict[str, float]:
    """Zero-shot accuracy of `model` (eval mode) on the teacher's validation images
    (`digits.teacher_val_images`), per demo domain; `normalize` maps [0, 1] images to its input."""
    text = model.encode_text(tokenizer([template.format(w) for w in sources.CLASS_WORDS]), normalize=True)
    result = {}
    for domain, (images, labels) in digits.teacher_val_images().items():
        x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        pred = (model.encode_image(x, normalize=True) @ text.T).argmax(-1)
        result[domain] = float((pred == torch.from_numpy(labels)).float().mean())
    return result


@torch.no_grad()
def zero_shot_accuracy(
    config_json: Path, weights_pt: Path, dataset_root: Path, template: str = "a photo of a {}"
) -> dict[str, float]:
    """Zero-shot accuracy of a demo teacher on each domain of `dataset_root` (the folder holding
    `<domain>/<class>/*.png`; class names are folder names with `_` read as a space)."""
    model, preprocess, tokenizer = load_demo_teacher(config_json, weights_pt)
    dataset_root = Path(dataset_root)
    result = {}
    for domain in sorted(p for p in dataset_root.iterdir() if p.is_dir()):
        classes = sorted(p for p in domain.iterdir() if p.is_dir())
        text = model.encode_text(tokenizer([template.format(c.name.replace("_", " ")) for c in
                                            classes]), normalize=True)  # fmt: skip
        correct = total = 0
        for label, folder in enumerate(classes):
            files = sorted(folder.glob("*.png"))
            for i in range(0, len(files), 512):
                x = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files[i:i + 512]])
                pred = (model.encode_image(x, normalize=True) @ text.T).argmax(-1)
                correct += int((pred == label).sum())
                total += len(x)
        result[domain.name] = correct / max(1, total)
    return result
