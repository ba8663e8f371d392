"""The CLIP teacher: any open_clip model with its own preprocessing and tokenizer; prompt templates."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from vl2v.data import suggest
from vl2v.runtime import UserError, download_guard

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "ViT-B-16-quickgelu:openai"  # the paper's OpenAI CLIP ViT-B/16 (QuickGELU)

# Prompt styles of the original code, plus CLIP's 80-template ImageNet ensemble.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a {}",),
    "name": ("{}",),
    "domains": ("an art of a {}", "a clipart of a {}", "a photo of a {} product", "a photo of a {}"),
    "imagenet80": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
}


def load_templates(prompts: str) -> list[str]:
    """A style name from TEMPLATES, or a text file with one template per line, each with `{}`."""
    if prompts in TEMPLATES:
        return list(TEMPLATES[prompts])
    path = Path(prompts)
    if not path.is_file():
        raise UserError(
            f"Unknown prompt style '{prompts}'.{suggest(prompts, list(TEMPLATES))} Choose one of "
            f"{', '.join(TEMPLATES)}, or pass a file with one template per line containing '{{}}'."
        )
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    bad = [ln for ln in lines if ln.count("{}") != 1]
    if not lines or bad:
        raise UserError(f"{path}: every line must be a template with exactly one '{{}}' (bad: {bad[:1] or 'empty file'}).")
    return lines


@dataclass(frozen=True)
class TeacherSpec:
    """`MODEL:PRETRAINED`, `hf-hub:ORG/REPO`, or `CONFIG.json[:WEIGHTS.pt]`."""

    model: str
    pretrained: str | None = None
    config: Path | None = None

    def __str__(self) -> str:
        base = str(self.config) if self.config else self.model
        return f"{base}:{self.pretrained}" if self.pretrained else base

    @property
    def slug(self) -> str:
        """A folder name for the cache: readable, filesystem-safe."""
        parts = [self.config.stem if self.config else self.model]
        if self.pretrained:
            parts.append(Path(self.pretrained).stem if self.config else self.pretrained)
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", "-".join(parts)).strip("_")


def parse_teacher_spec(spec: str) -> TeacherSpec:
    if spec.startswith("hf-hub:"):
        return TeacherSpec(model=spec)
    head, sep, weights = spec.partition(".json")
    if sep:
        config = Path(head + sep).expanduser().resolve()
        if not config.is_file():
            raise UserError(f"Teacher config not found: {config}")
        weights = weights.removeprefix(":")
        if weights and not Path(weights).expanduser().is_file():
            raise UserError(f"Teacher weights not found: {weights} (from --teacher {spec})")
        return TeacherSpec(config.stem, str(Path(weights).expanduser().resolve()) if weights else None, config)
    model, _, pretrained = spec.partition(":")
    return TeacherSpec(model, pretrained or None)


@dataclass
class Teacher:
    spec: TeacherSpec
    model: torch.nn.Module
    preprocess: object  # the teacher's own eval transform: PIL image -> [3, H, W]
    tokenizer: object
    embed_dim: int
    logit_scale: float
    device: torch.device

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def random_init(self) -> bool:
        return self.spec.pretrained is None and not self.spec.model.startswith("hf-hub:")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed -> [B, D] L2-normalised float32."""
        return F.normalize(self.model.encode_image(images.to(self.device, non_blocking=True)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """N prompts -> [N, D] L2-normalised float32."""
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def provenance(self) -> dict:
        return {
            "teacher": str(self.spec),
            "open_clip_version": open_clip.__version__,
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "preprocess": str(self.preprocess),
            "random_init": self.random_init,
        }


def create_teacher(spec: str | TeacherSpec, device: torch.device, precision: str = "fp32") -> Teacher:
    """Build the open_clip model, its eval preprocessing and tokenizer."""
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    if spec.config is not None:
        open_clip.add_model_config(spec.config)
    elif not spec.model.startswith("hf-hub:") and spec.model not in open_clip.list_models():
        raise UserError(
            f"Unknown open_clip model '{spec.model}'.{suggest(spec.model, open_clip.list_models())} "
            "List them with `python -c 'import open_clip; print(open_clip.list_models())'`."
        )
    pretrained = None if spec.config else spec.pretrained
    if pretrained and not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(spec.model):
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        raise UserError(f"Unknown weights '{pretrained}' for {spec.model}.{suggest(pretrained, tags)} Tags: {', '.join(tags)}.")
    with download_guard(f"teacher weights for {spec}", "Place the weights file on disk and pass --teacher MODEL:/path/to/weights.pt."):
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=pretrained, precision=precision, device=device)
    if spec.config and spec.pretrained:
        state = torch.load(spec.pretrained, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    elif spec.config:
        log.warning("teacher %s has no weights: randomly initialised", spec.config)
    model.eval()
    embed_dim = open_clip.get_model_config(spec.model)["embed_dim"] if spec.model in open_clip.list_models() else None
    tokenizer = open_clip.get_tokenizer(spec.model)
    if embed_dim is None:  # hf-hub models: ask the model once
        with torch.no_grad():
            embed_dim = model.encode_text(tokenizer(["a"]).to(device)).shape[-1]
    return Teacher(spec, model, preprocess, tokenizer, int(embed_dim), float(model.logit_scale.detach().exp()), device)


def build_text_embeddings(teacher: Teacher, classnames: list[str], templates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-template and class embeddings (each template's normalised, averaged, normalised again).

    Returns: ([C, T, D] per-template, [C, D] class) L2-normalised float32.
    """
    prompts = [t.format(c) for c in classnames for t in templates]
    per_template = torch.cat([teacher.encode_texts(prompts[i : i + 256]) for i in range(0, len(prompts), 256)])
    per_template = per_template.view(len(classnames), len(templates), -1).cpu()
    return per_template, F.normalize(per_template.mean(dim=1), dim=-1)
