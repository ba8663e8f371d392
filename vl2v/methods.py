"""Training methods as a registry (as DomainBed's algorithms): what trains, which head, the loss on a
batch, what the method needs from the teacher cache, and which run it continues. The one training
loop calls these; adding a method is one `register` call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vl2v.data import suggest
from vl2v.losses import adip_loss, kd_loss
from vl2v.runtime import UserError


@dataclass(frozen=True)
class StepTargets:
    """What a training step knows of its batch besides the images."""

    labels: torch.Tensor  # [B]
    image: torch.Tensor | None  # [B, D] cached teacher image embeddings (L2-normalised), if needed
    text: torch.Tensor | None  # [C, D] cached class text embeddings (L2-normalised), if needed
    logit_scale: float


# loss(head, features, targets, cfg) -> scalar; `features` are the featurizer's output [B, F].
Loss = Callable[[torch.nn.Module, torch.Tensor, StepTargets, object], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    head: str  # "text": the teacher's class-text head; "linear": a trained classifier
    trains: frozenset[str]  # of "featurizer", "head"
    needs_cache: bool  # trains from cached teacher targets (image embeddings, class text)
    loss: Loss
    starts_from: str | None = None  # the method whose run (same held-out domain) it continues

    @property
    def trains_featurizer(self) -> bool:
        return "featurizer" in self.trains


METHODS: dict[str, Method] = {}
# `vl2v run --methods` names: a pipeline of methods, each continuing the one before.
PIPELINES: dict[str, tuple[str, ...]] = {"adip": ("align", "distill")}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"Unknown method '{name}'.{suggest(name, list(METHODS))} Methods: {', '.join(METHODS)}.")
    return METHODS[name]


def expand_methods(names: list[str]) -> list[str]:
    """`--methods adip,erm` -> ["align", "distill", "erm"]: pipelines expanded, duplicates dropped."""
    out: list[str] = []
    for name in names:
        if name not in PIPELINES and name not in METHODS:
            choices = [*PIPELINES, *METHODS]
            raise UserError(f"Unknown method '{name}'.{suggest(name, choices)} Choose from: {', '.join(choices)}.")
        for m in PIPELINES.get(name, (name,)):
            if m not in out:
                if (start := METHODS[m].starts_from) and start not in out:
                    out.append(start)
                out.append(m)
    return out


def _adip(head, features, t: StepTargets, cfg) -> torch.Tensor:
    return adip_loss(head.embed(features).float(), t.image, t.text.index_select(0, t.labels), cfg.lmd)


def _erm(head, features, t: StepTargets, cfg) -> torch.Tensor:
    return F.cross_entropy(head(features).float(), t.labels)


def _kd(head, features, t: StepTargets, cfg) -> torch.Tensor:
    teacher_logits = t.logit_scale * t.image @ t.text.T  # the teacher's zero-shot logits
    return kd_loss(head(features).float(), t.labels, teacher_logits, cfg.kd_temperature, cfg.kd_weight)


register(Method("align", "VL2V-ADiP stage 1: train the projection onto the teacher's embeddings, featurizer frozen",
                head="text", trains=frozenset({"head"}), needs_cache=True, loss=_adip))
register(Method("distill", "VL2V-ADiP stage 2: train the featurizer from the Align model, projection frozen",
                head="text", trains=frozenset({"featurizer"}), needs_cache=True, loss=_adip, starts_from="align"))
register(Method("erm", "baseline: cross-entropy on the labels with a trained linear classifier (no teacher)",
                head="linear", trains=frozenset({"featurizer", "head"}), needs_cache=False, loss=_erm))
register(Method("kd", "baseline: cross-entropy plus KL divergence to the teacher's zero-shot class probabilities",
                head="linear", trains=frozenset({"featurizer", "head"}), needs_cache=True, loss=_kd))
