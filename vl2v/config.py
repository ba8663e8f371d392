"""Training hyperparameters: one frozen dataclass with the paper's defaults, resolved in one place."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vl2v.data import DomainBedInfo, suggest
from vl2v.methods import get_method
from vl2v.runtime import UserError

def setting(default, help: str, *, flag: bool = True, methods: tuple[str, ...] = (), **kw):
    """A TrainConfig field with its CLI help. `flag=False`: config file only; `methods`: only the
    commands that can run one of these methods show the flag."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "flag": flag, "methods": methods, **kw})


DEFAULT_TEACHER = "ViT-B-16-quickgelu:openai"  # the paper's OpenAI CLIP ViT-B/16 (QuickGELU)
# Settings a continuing run (Distill) takes from the run it continues: they fix the model and splits.
INHERITED = ("student", "pretrained", "image_size", "model_kwargs", "holdout", "trial_seed")
NO_TEST_ENV = "none"  # --test-env none: a deployment run, every domain trains


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting, with the paper's defaults. The CLI's training flags are made from these
    fields (vl2v.cli), so a new setting is this one edit."""

    method: str = setting("align", "Training method (see `vl2v.methods`).", flag=False)
    student: str = setting("vits", "timm model name or alias (rn50, vitb, vits, deits), or `teacher` for the teacher's own image tower (white box).")
    pretrained: bool = setting(True, "Start from timm's pretrained weights.")
    image_size: int | None = setting(None, "Student input size.", shown="the student's pretrained size")
    model_kwargs: dict = setting(dict, "Extra timm create_model argument KEY=VALUE (repeatable), e.g. zero_init_last=False.", shown="none")
    lr: float = setting(5e-5, "Adam learning rate.")
    weight_decay: float = setting(0.0, "Adam weight decay.")
    warmup_steps: int = setting(0, "Linear learning-rate warm-up over the first N steps (0: none, the paper's).")
    batch_size: int = setting(32, "Images per training domain per step.")
    steps: int = setting(5001, "Training steps.", shown="5001; DomainNet 15001")
    checkpoint_freq: int = setting(200, "Validate and checkpoint every N steps.", shown="200; DomainNet 1000")
    model_save: int = setting(100, "best.pt (what Distill starts from) is the best training-domain validation checkpoint at a step ≥ N, ties to the later.")
    freeze_bn: bool = setting(True, "Keep BatchNorm layers in eval mode.")
    views: str = setting("auto", "auto: train on the cache's augmented views when it has them (each sampled image takes a stored view; its target is the teacher's embedding of that view); off: a fresh augmentation each step and the un-augmented image's target.")
    fast_align: str = setting("auto", "auto: with cached views and a featurizer that is frozen and in eval mode, compute its features once (RUN/features/) and train the projection on them; off: run the featurizer at every step.", methods=("align",))
    lmd: float = setting(0.5, "Weight of the image-embedding term of the Align/Distill loss.", methods=("align", "distill"))
    kd_temperature: float = setting(4.0, "KD: softmax temperature of teacher and student logits.", methods=("kd",))
    kd_weight: float = setting(0.5, "KD: weight of the KL term (1 − it weighs the label cross-entropy).", methods=("kd",))
    holdout: float = setting(0.2, "Fraction of each domain held out for validation.")
    trial_seed: int = setting(0, "DomainBed trial seed (the in/out split).")
    seed: int = setting(0, "Seed of batches, augmentation and initial weights.")
    test_envs: tuple[str, ...] = setting(tuple, "Held-out domain (repeatable); `none`: train on every domain (a model to deploy).", shown="every domain in turn")
    swad: bool = setting(True, "Average weights over SWAD's loss valley.")
    n_converge: int = setting(3, "SWAD: checkpoints whose oldest must be the lowest loss.", flag=False)
    n_tolerance: int = setting(6, "SWAD: checkpoints the valley may stay above its threshold.", flag=False)
    tolerance_ratio: float = setting(0.3, "SWAD: threshold = (1 + ratio) × the converged mean loss.", flag=False)
    workers: int = setting(min(4, os.cpu_count() or 1), "Image-decoding worker processes.")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.")
    precision: str = setting("fp32", "fp32, or fp16 / bf16 autocast on CUDA.")
    eval_batch_size: int = setting(128, "Images per evaluation batch.")
    eval_splits: str = setting("all", "What each checkpoint validates: all (every domain's in and out splits, as DomainBed) or selection (what selection and the results read: every out split and the held-out domain's in split; with 4 domains, 2.5× fewer images).")
    log: str = setting("none", "Training curves: none, or tensorboard (scalars beside results.jsonl).")
    parallel: str = setting("auto", "Under torchrun: domains (processes share the held-out domains), ddp (every process trains a slice of each batch), or auto (domains while there are at least as many as processes, else ddp).")

    def __post_init__(self):
        _check_types(self)
        get_method(self.method)
        positive = {"steps": self.steps, "checkpoint_freq": self.checkpoint_freq, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, not {value}.")
        if self.eval_splits not in EVAL_SPLITS:
            raise UserError(f"--eval-splits must be one of {', '.join(EVAL_SPLITS)}, not '{self.eval_splits}'.")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be ≥ 0, not {self.warmup_steps}.")
        if not 0.0 < self.holdout < 1.0:
            raise UserError(f"--holdout must be between 0 and 1, not {self.holdout}.")
        for name in ("lmd", "kd_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1, not {getattr(self, name)}.")
        if self.kd_temperature <= 0:
            raise UserError(f"--kd-temperature must be > 0, not {self.kd_temperature}.")
        if self.log not in LOGS:
            raise UserError(f"--log must be one of {', '.join(LOGS)}, not '{self.log}'.")
        if self.parallel not in PARALLEL:
            raise UserError(f"--parallel must be one of {', '.join(PARALLEL)}, not '{self.parallel}'.")
        for name in ("views", "fast_align"):
            if getattr(self, name) not in AUTO_OFF:
                raise UserError(f"--{name.replace('_', '-')} must be auto or off, not '{getattr(self, name)}'.")
        object.__setattr__(self, "test_envs", tuple(self.test_envs))
        if NO_TEST_ENV in self.test_envs and len(self.test_envs) > 1:
            raise UserError("--test-env none (train on every domain) cannot be combined with held-out domains.")

    @property
    def deploy(self) -> bool:
        """A run with no held-out domain: one model trained on every domain."""
        return self.test_envs == (NO_TEST_ENV,)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


LOGS = ("none", "tensorboard")
PARALLEL = ("auto", "domains", "ddp")
AUTO_OFF = ("auto", "off")
EVAL_SPLITS = ("all", "selection")
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_TYPES = {bool: ("true or false", (bool,)), int: ("a whole number", (int,)), float: ("a number", (int, float)),
          str: ("a string", (str,)), dict: ("a JSON object", (dict,)), tuple: ("a list of domain names", (list, tuple))}


def _check_types(cfg: TrainConfig) -> None:
    """Settings from a JSON file or the API have the type of their default (None allowed for image_size)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = int if f.name == "image_size" else type(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if f.name == "image_size" and value is None:
            continue
        what, allowed = _TYPES[kind]
        ok = isinstance(value, allowed) and (kind is bool or not isinstance(value, bool))
        if ok and kind is tuple:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise UserError(f"Setting '{f.name}' must be {what}, not {value!r}.")
        if kind is float:
            object.__setattr__(cfg, f.name, float(value))


def dataset_overrides(info: DomainBedInfo | None) -> dict:
    """The paper's per-dataset settings (DomainNet trains longer)."""
    return {} if info is None else {"steps": info.steps, "checkpoint_freq": info.checkpoint_freq}


def load_config_file(path: Path) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path} is not valid JSON: {e}") from None
    check_keys(values, f"--config {path}")
    return values


def check_keys(values: dict, where: str) -> None:
    for key in values:
        if key not in FIELDS:
            raise UserError(f"{where}: unknown setting '{key}'.{suggest(key, sorted(FIELDS))}")


def resolve_config(info: DomainBedInfo | None, config_file: Path | None, flags: dict) -> TrainConfig:
    """Defaults < dataset overrides < --config file < flags given on the command line (not None)."""
    values = dataset_overrides(info)
    if config_file is not None:
        values.update(load_config_file(config_file))
    given = {k: v for k, v in flags.items() if v is not None}
    check_keys(given, "flags")
    values.update(given)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise UserError(f"Bad training settings: {e}") from None
