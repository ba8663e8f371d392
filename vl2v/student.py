"""The student: a timm featurizer, a linear projection to the teacher's width, a text-embedding head."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vl2v.data import suggest
from vl2v.runtime import UserError, download_guard

# The paper's four students, with the exact weights the original code used.
ALIASES = {
    "rn50": "resnet50.tv_in1k",
    "vitb": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vits": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "deits": "deit_small_distilled_patch16_224.fb_in1k",
}


@dataclass(frozen=True)
class DataConfig:
    """What the student's pretraining expects of its input."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TextHead(nn.Module):
    """`normalize(P f) · Wᵀ`: a linear projection to the teacher's width against W, the teacher's class
    text embeddings × its logit scale (a buffer: the teacher's text is the classifier)."""

    def __init__(self, num_features: int, class_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        self.projection = nn.Linear(num_features, class_embeddings.shape[1])
        self.register_buffer("classifier", class_embeddings.float() * logit_scale)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(features), dim=-1) @ self.classifier.T


class LinearHead(nn.Module):
    """A trained linear classifier on the features (DomainBed's ERM); its embedding is the features."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(num_features, num_classes)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


class Student(nn.Module):
    """A featurizer and a head. `forward` is a static graph (export traces it as it is): what trains
    is decided by the training loop, never inspected here."""

    def __init__(self, featurizer: nn.Module, head: nn.Module):
        super().__init__()
        self.featurizer = featurizer
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C] logits."""
        return self.head(self.featurizer(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] L2-normalised embedding (the projected features of a text head)."""
        return F.normalize(self.head.embed(self.featurizer(x)), dim=-1)


def build_head(kind: str, num_features: int, num_classes: int, text: torch.Tensor | None = None, logit_scale: float = 1.0) -> nn.Module:
    """`text`: the teacher's class-text head (needs `text` [C, D]); `linear`: a trained classifier."""
    if kind == "text":
        if text is None:
            raise UserError("The teacher's class-text head needs the teacher cache's class embeddings.")
        return TextHead(num_features, text, logit_scale)
    return LinearHead(num_features, num_classes)


def resolve_student_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if not timm.is_model(name):
        models = timm.list_models()
        arch = name.split(".")[0]
        raise UserError(
            f"Unknown student '{name}'.{suggest(arch, models)} "
            f"(timm has {len(models):,} models: `python -c 'import timm; print(timm.list_models(\"*{arch[:4]}*\"))'`; "
            f"aliases: {', '.join(ALIASES)})"
        )
    return name


def create_featurizer(name: str, pretrained: bool = True, image_size: int | None = None, **kwargs) -> tuple[nn.Module, DataConfig]:
    """A timm model with its classifier removed (`num_classes=0`) and its data config.
    `image_size` is passed to models that fix it at build time (ViTs); CNNs take any size."""
    name = resolve_student_name(name)
    with download_guard(f"pretrained weights for {name}", "Use --no-pretrained, or put the weights in the Hugging Face cache (HF_HOME)."):
        try:
            model = _create(name, pretrained, image_size, kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"Cannot build student {name} with {kwargs}: {e}") from None
        except RuntimeError as e:
            if "pretrained tag" not in str(e):
                raise
            arch = name.split(".")[0]
            raise UserError(f"{e} List tags: `python -c 'import timm; print(timm.list_pretrained(\"{arch}*\"))'`.") from None
    cfg = timm.data.resolve_model_data_config(model)
    return model, DataConfig(image_size or cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]))


def _create(name: str, pretrained: bool, image_size: int | None, kwargs: dict) -> nn.Module:
    if image_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=image_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


def create_student(name: str, head: str, num_classes: int, text: torch.Tensor | None = None, logit_scale: float = 1.0,
                   pretrained: bool = True, image_size: int | None = None, **kwargs) -> tuple[Student, DataConfig]:
    """The featurizer and a fresh head of kind `head` (see `build_head`)."""
    featurizer, data_cfg = create_featurizer(name, pretrained, image_size, **kwargs)
    return Student(featurizer, build_head(head, featurizer.num_features, num_classes, text, logit_scale)), data_cfg


# --- the white-box student: the teacher's own image tower -------------------------------------------

TEACHER_STUDENT = "teacher"  # --student teacher


class TeacherTower(nn.Module):
    """An open_clip image tower as a featurizer. A ViT tower's final projection is taken out (it
    initialises the head's projection); other towers keep theirs and output the embedding."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        proj = getattr(visual, "proj", None)
        self.initial_projection = proj.detach().clone().T if isinstance(proj, torch.Tensor) else None  # [D, F]
        if self.initial_projection is not None:
            visual.proj = None
        self.visual = visual
        self.num_features = proj.shape[0] if self.initial_projection is not None else int(visual.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _white_box_spec(teacher: str | None):
    from vl2v.teacher import parse_teacher_spec

    spec = parse_teacher_spec(teacher) if teacher else None
    no_weights = spec is None or spec.remote or (spec.pretrained in (None, "random") and not spec.model.startswith("hf-hub:"))
    if no_weights:
        raise UserError(
            f"--student teacher needs the teacher's weights; the teacher is {teacher or 'unknown'}. "
            "It needs a local teacher with weights (MODEL:TAG or CONFIG.json:WEIGHTS.pt); a teacher server's stay with the vendor."
        )
    return spec


def _teacher_tower(teacher: str | None) -> tuple[TeacherTower, DataConfig]:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from vl2v.teacher import create_teacher

    model = create_teacher(_white_box_spec(teacher), torch.device("cpu")).model
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    data_cfg = DataConfig(size, tuple(pp.get("mean", OPENAI_DATASET_MEAN)), tuple(pp.get("std", OPENAI_DATASET_STD)))
    return TeacherTower(model.visual), data_cfg


def build_student(cfg, head: str, num_classes: int, text: torch.Tensor | None, logit_scale: float, teacher: str | None,
                  pretrained: bool) -> tuple[Student, DataConfig]:
    """The student of a TrainConfig: a timm model, or (`--student teacher`) the teacher's image tower
    with the head's projection initialised from the teacher's own."""
    if cfg.student != TEACHER_STUDENT:
        return create_student(cfg.student, head, num_classes, text, logit_scale, pretrained, cfg.image_size, **cfg.model_kwargs)
    tower, data_cfg = _teacher_tower(teacher)
    model = Student(tower, build_head(head, tower.num_features, num_classes, text, logit_scale))
    if isinstance(model.head, TextHead):
        with torch.no_grad():
            proj = model.head.projection
            init = tower.initial_projection
            proj.weight.copy_(init if init is not None else torch.eye(proj.out_features, proj.in_features))
            proj.bias.zero_()
    return model, data_cfg


def check_student(cfg, teacher: str | None) -> None:
    """Fail early (before a run directory is made) on a student that cannot be built."""
    if cfg.student == TEACHER_STUDENT:
        _white_box_spec(teacher)
    else:
        create_featurizer(cfg.student, pretrained=False, image_size=cfg.image_size, **cfg.model_kwargs)
