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


class Student(nn.Module):
    """`normalize(P f(x)) · Wᵀ`: W holds the teacher's class text embeddings × its logit scale."""

    def __init__(self, featurizer: nn.Module, class_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        self.featurizer = featurizer
        self.projection = nn.Linear(featurizer.num_features, class_embeddings.shape[1])
        self.register_buffer("classifier", class_embeddings.float() * logit_scale)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] projected features (not normalised). A frozen featurizer runs
        without building a graph: Align trains only the projection."""
        frozen = not any(p.requires_grad for p in self.featurizer.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.featurizer(x)
        return self.projection(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C] logits against the class text embeddings."""
        return F.normalize(self.embed(x), dim=-1) @ self.classifier.T


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


def create_student(name: str, targets_text: torch.Tensor, logit_scale: float, pretrained: bool = True, image_size: int | None = None, **kwargs) -> tuple[Student, DataConfig]:
    """The featurizer, a fresh projection, and the head built from the cached class embeddings [C, D]."""
    featurizer, data_cfg = create_featurizer(name, pretrained, image_size, **kwargs)
    return Student(featurizer, targets_text, logit_scale), data_cfg
