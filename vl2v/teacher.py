"""The CLIP teacher: any open_clip model with its own preprocessing and tokenizer, its identity for
provenance, the backend seam a remote teacher shares; prompt templates."""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch.utils.data import DataLoader

from vl2v.config import DEFAULT_TEACHER  # the paper's OpenAI CLIP ViT-B/16 (QuickGELU)
from vl2v.data import ImageDataset, suggest
from vl2v.runtime import UserError, autocast_dtype, download_guard
from vl2v.views import DrawnViews, ViewImages

log = logging.getLogger(__name__)


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


RANDOM = "random"  # `MODEL:random`: random weights, only when asked for by name
URL_RE = re.compile(r"^https?://", re.IGNORECASE)


@dataclass(frozen=True)
class TeacherSpec:
    """`MODEL:PRETRAINED`, `MODEL:random`, `hf-hub:ORG/REPO`, `CONFIG.json[:WEIGHTS.pt|:random]`, or
    `http(s)://HOST:PORT` (a `vl2v serve-teacher` server)."""

    model: str
    pretrained: str | None = None
    config: Path | None = None

    def __str__(self) -> str:
        base = str(self.config) if self.config else self.model
        return f"{base}:{self.pretrained}" if self.pretrained else base

    @property
    def remote(self) -> bool:
        return bool(URL_RE.match(self.model))

    @property
    def slug(self) -> str:
        """A folder name for the cache: readable, filesystem-safe."""
        if self.remote:
            parts = ["remote", self.model.split("://", 1)[1]]
        else:
            parts = [self.config.stem if self.config else self.model]
            if self.pretrained:
                parts.append(Path(self.pretrained).stem if self.config else self.pretrained)
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", "-".join(parts)).strip("_")


def parse_teacher_spec(spec: str) -> TeacherSpec:
    if URL_RE.match(spec):
        return TeacherSpec(model=spec.rstrip("/"))
    if spec.startswith("hf-hub:"):
        return TeacherSpec(model=spec)
    head, sep, weights = spec.partition(".json")
    if sep:
        config = Path(head + sep).expanduser().resolve()
        if not config.is_file():
            raise UserError(f"Teacher config not found: {config}")
        weights = weights.removeprefix(":")
        if weights == RANDOM:
            return TeacherSpec(config.stem, RANDOM, config)
        # whether the weights file exists is checked where it is read (resolve_weights): training
        # from a complete cache never needs it
        return TeacherSpec(config.stem, str(Path(weights).expanduser().resolve()) if weights else None, config)
    model, _, pretrained = spec.partition(":")
    return TeacherSpec(model, pretrained or None)


class TeacherBackend(Protocol):
    """What the embed job needs from a teacher, local (`Teacher`) or behind a server
    (`vl2v.remote.RemoteTeacher`): the cache, zero-shot and training never see the difference."""

    embed_dim: int
    logit_scale: float
    preprocess: object  # the teacher's own image preprocessing (a description for a remote one)

    @property
    def image_size(self) -> tuple[int, int]: ...

    def identity(self) -> dict:
        """{"model": name, "weights": "sha256:..." or "random"}: what the cache's provenance compares."""

    def provenance(self) -> dict: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """N prompts -> [N, D] L2-normalised float32."""

    def encode_image_files(self, root: Path, batches: list[list[str]], workers: int = 0, precision: str = "fp32") -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Files `root/path`, batch by batch -> (batch number, [B, D] L2-normalised float32, [B]
        decoded), as answers arrive (a remote teacher may answer out of order)."""

    def encode_view_files(self, root: Path, batches: list[list[str]], ks: range, seed: int, workers: int = 0,
                          precision: str = "fp32") -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Views `ks` of each file (`vl2v.views`, drawn from (seed, path, k)), rendered at the teacher's
        input size, batch by batch -> (batch number, [B, K', D] L2-normalised float32, [B] decoded,
        [B, K', N_PARAMS] float32 view parameters). Each view is one image query."""

    def cost(self) -> dict:
        """What this teacher object was paid so far: queries, requests, retries, bytes sent."""


@dataclass
class Teacher:
    """A local open_clip teacher; the `TeacherBackend` of `--teacher MODEL:...` and of the server."""

    spec: TeacherSpec
    model: torch.nn.Module
    preprocess: object  # the teacher's own eval transform: PIL image -> [3, H, W]
    tokenizer: object
    embed_dim: int
    logit_scale: float
    device: torch.device
    weights: str  # "sha256:<hex>" of the weights file, or "random"
    paid: dict = field(default_factory=lambda: {"images": 0, "views": 0, "texts": 0, "requests": 0})

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def random_init(self) -> bool:
        return self.weights == RANDOM

    def identity(self) -> dict:
        return {"model": self.spec.model, "weights": self.weights}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed -> [B, D] L2-normalised float32."""
        return F.normalize(self.model.encode_image(images.to(self.device, non_blocking=True)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """N prompts -> [N, D] L2-normalised float32."""
        self.paid["texts"] += len(texts)
        self.paid["requests"] += 1
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_image_files(self, root: Path, batches: list[list[str]], workers: int = 0, precision: str = "fp32") -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Decode with `workers` processes (the teacher's own preprocessing), one forward per batch,
        in order. A file that fails to decode gives a zero row and decoded=False."""
        amp = autocast_dtype(precision, self.device)
        paths = [p for batch in batches for p in batch]
        dataset = ImageDataset(root, paths, self.preprocess, (3, *self.image_size))
        for b, (images, _, good) in enumerate(self._loader(dataset, batches, workers)):
            emb = np.zeros((len(good), self.embed_dim), dtype=np.float32)
            keep = good.nonzero().flatten()
            if len(keep):
                with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                    emb[keep.numpy()] = self.encode_images(images[keep]).cpu().numpy()
            self.paid["images"] += len(keep)
            self.paid["requests"] += 1
            yield b, emb, good.numpy()

    def encode_view_files(self, root: Path, batches: list[list[str]], ks: range, seed: int, workers: int = 0,
                          precision: str = "fp32") -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Views rendered with the teacher's own normalisation at its input size, decoded and drawn in
        `workers` processes; one forward per batch (all its views), in order."""
        amp = autocast_dtype(precision, self.device)
        mean, std = normalization(self.preprocess)
        dataset = ViewImages(root, [p for batch in batches for p in batch], DrawnViews(seed, ks), self.image_size, mean, std)
        for b, (views, params, good) in enumerate(self._loader(dataset, batches, workers)):
            emb = np.zeros((len(good), len(ks), self.embed_dim), dtype=np.float32)
            keep = good.nonzero().flatten()
            if len(keep):
                with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                    flat = self.encode_images(views[keep].flatten(0, 1)).cpu().numpy()
                emb[keep.numpy()] = flat.reshape(len(keep), len(ks), -1)
            self.paid["views"] += len(keep) * len(ks)
            self.paid["requests"] += 1
            yield b, emb, good.numpy(), params.numpy()

    def _loader(self, dataset, batches: list[list[str]], workers: int) -> DataLoader:
        """`dataset` (one item per path of `batches`, flattened) loaded batch by batch."""
        starts = np.cumsum([0] + [len(b) for b in batches])
        sampler = [list(range(starts[i], starts[i + 1])) for i in range(len(batches))]
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda")

    def cost(self) -> dict:
        """Queries and forward passes (`requests`) so far; nothing is sent anywhere."""
        return {"image_queries": self.paid["images"], "view_queries": self.paid["views"], "text_queries": self.paid["texts"], "from_record": 0,
                "requests": self.paid["requests"], "retries": 0, "bytes_sent": 0}

    def provenance(self) -> dict:
        return {
            "teacher": str(self.spec),
            "identity": self.identity(),
            "open_clip_version": open_clip.__version__,
            "embed_dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "preprocess": str(self.preprocess),
            "random_init": self.random_init,
        }


def normalization(preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the Normalize step of a teacher's preprocessing: what its views are normalised with."""
    for step in getattr(preprocess, "transforms", []):
        if isinstance(step, T.Normalize):
            return tuple(float(x) for x in step.mean), tuple(float(x) for x in step.std)
    raise UserError(f"The teacher's preprocessing has no Normalize step to render views with: {preprocess}")


def _check_model(model: str) -> None:
    if model not in open_clip.list_models():
        raise UserError(
            f"Unknown open_clip model '{model}'.{suggest(model, open_clip.list_models())} "
            "List them with `python -c 'import open_clip; print(open_clip.list_models())'`."
        )


def check_weights_named(spec: TeacherSpec) -> None:
    """Refuse a local spec that names no weights (random weights are asked for by name, `:random`)
    or names an unknown model or tag; needs no download."""
    if spec.remote or spec.pretrained == RANDOM or spec.model.startswith("hf-hub:"):
        return
    if spec.config is not None:
        if not spec.pretrained:
            raise UserError(f"--teacher {spec} names no weights: pass {spec}:WEIGHTS.pt, or {spec}:{RANDOM} for random weights.")
        return
    _check_model(spec.model)
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if not spec.pretrained:
        known = f"one of its pretrained tags ({', '.join(tags)}), e.g. --teacher {spec.model}:{tags[0]}, " if tags else "MODEL:/path/to/weights.pt, "
        raise UserError(f"--teacher {spec.model} names no weights: pass {known}or {spec.model}:{RANDOM} for random weights.")
    if not Path(spec.pretrained).is_file() and spec.pretrained not in tags:
        raise UserError(f"Unknown weights '{spec.pretrained}' for {spec.model}.{suggest(spec.pretrained, tags)} Tags: {', '.join(tags)}.")


def _download_guard(spec: TeacherSpec):
    return download_guard(f"teacher weights for {spec}", "Place the weights file on disk and pass --teacher MODEL:/path/to/weights.pt.")


def resolve_weights(spec: TeacherSpec) -> Path | None:
    """The weights file a local spec loads (fetched into the hub cache if need be); None for
    `:random`."""
    check_weights_named(spec)
    if spec.pretrained == RANDOM:
        return None
    if spec.config is not None:
        if not Path(spec.pretrained).is_file():
            raise UserError(f"Teacher weights not found: {spec.pretrained} (from --teacher {spec})")
        return Path(spec.pretrained)
    with _download_guard(spec):
        if spec.model.startswith("hf-hub:"):
            return Path(download_pretrained_from_hf(spec.model.removeprefix("hf-hub:")))
        if Path(spec.pretrained).is_file():
            return Path(spec.pretrained).resolve()
        return Path(open_clip.download_pretrained(open_clip.get_pretrained_cfg(spec.model, spec.pretrained)))


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def weights_hash(path: Path | None) -> str:
    """"sha256:<hex>" of a weights file (its content, not its path), or "random"."""
    if path is None:
        return RANDOM
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def teacher_identity(spec: str | TeacherSpec, token: str | None = None) -> dict:
    """A teacher's identity without building it: model name and weights hash, or what a server's
    info endpoint reports (the same for the same model and weights file)."""
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    if spec.remote:
        from vl2v.remote import RemoteTeacher

        with RemoteTeacher(str(spec), token) as remote:
            return remote.identity()
    return {"model": spec.model, "weights": weights_hash(resolve_weights(spec))}


def is_built_by(provenance: dict, spec: str | TeacherSpec, token: str | None = None) -> bool:
    """Whether a cache's provenance comes from the teacher `spec`: same identity (caches from before
    identities existed: same spec). Another model, or the same pretrained tag, is told without
    fetching weights."""
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    stored = provenance.get("identity")
    if stored is None:
        return provenance["teacher"] == str(spec)
    if not spec.remote and stored.get("model") != spec.model:
        return False
    published = spec.config is None and not spec.remote and not (spec.pretrained and Path(spec.pretrained).is_file())
    if published and provenance["teacher"] == str(spec):
        return True  # a pretrained tag or hub repo names one published file: no need to fetch it
    return stored == teacher_identity(spec, token)


def describe_identity(identity: dict) -> str:
    weights = identity["weights"]
    return f"{identity['model']} (weights {weights[:19] + '…' if weights.startswith('sha256:') else weights})"


def create_teacher(spec: str | TeacherSpec, device: torch.device, precision: str = "fp32") -> Teacher:
    """Build the open_clip model, its eval preprocessing and tokenizer."""
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    if spec.remote:
        raise UserError(f"{spec} is a teacher server: connect with vl2v.remote.RemoteTeacher, not create_teacher.")
    if spec.config is not None:
        open_clip.add_model_config(spec.config)
    weights = resolve_weights(spec)
    pretrained = None if spec.config or weights is None else spec.pretrained  # a tag also sets preprocessing
    with _download_guard(spec):
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=pretrained, precision=precision, device=device)
    if spec.config and weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    if weights is None:
        log.warning("teacher %s: random weights, as asked (%s)", spec.model, spec)
    model.eval()
    embed_dim = open_clip.get_model_config(spec.model)["embed_dim"] if spec.model in open_clip.list_models() else None
    tokenizer = open_clip.get_tokenizer(spec.model)
    if embed_dim is None:  # hf-hub models: ask the model once
        with torch.no_grad():
            embed_dim = model.encode_text(tokenizer(["a"]).to(device)).shape[-1]
    logit_scale = float(model.logit_scale.detach().exp())
    return Teacher(spec, model, preprocess, tokenizer, int(embed_dim), logit_scale, device, weights_hash(weights))


def build_text_embeddings(teacher: TeacherBackend, classnames: list[str], templates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-template and class embeddings (each template's normalised, averaged, normalised again).

    Returns: ([C, T, D] per-template, [C, D] class) L2-normalised float32.
    """
    prompts = [t.format(c) for c in classnames for t in templates]
    per_template = torch.cat([teacher.encode_texts(prompts[i : i + 256]) for i in range(0, len(prompts), 256)])
    per_template = per_template.view(len(classnames), len(templates), -1).cpu()
    return per_template, F.normalize(per_template.mean(dim=1), dim=-1)
