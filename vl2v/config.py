"""Training hyperparameters: one frozen dataclass with the paper's defaults, resolved in one place."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vl2v.data import DomainBedInfo, suggest
from vl2v.runtime import UserError

STAGES = ("align", "distill")


@dataclass(frozen=True)
class TrainConfig:
    """One stage of VL2V-ADiP. Align and Distill differ only in `stage` (what is frozen, where it starts)."""

    stage: str = "align"
    student: str = "vits"  # a timm name or an alias of vl2v.student.ALIASES
    pretrained: bool = True
    image_size: int | None = None  # None: the student's pretrained input size
    model_kwargs: dict = field(default_factory=dict)  # extra timm create_model arguments
    lr: float = 5e-5  # Adam, as the paper
    weight_decay: float = 0.0
    batch_size: int = 32  # per training domain per step
    steps: int = 5001  # DomainNet: 15001
    checkpoint_freq: int = 200  # DomainNet: 1000
    freeze_bn: bool = True
    lmd: float = 0.5  # weight of the image-embedding term of the loss
    holdout: float = 0.2  # each domain's "out" fraction (DomainBed)
    trial_seed: int = 0  # picks the in/out split
    seed: int = 0  # picks batches and augmentation
    test_envs: tuple[str, ...] = ()  # held-out domains; empty: every domain in turn
    swad: bool = True
    n_converge: int = 3
    n_tolerance: int = 6
    tolerance_ratio: float = 0.3
    workers: int = min(4, os.cpu_count() or 1)
    device: str = "auto"
    precision: str = "fp32"
    eval_batch_size: int = 128

    def __post_init__(self):
        _check_types(self)
        if self.stage not in STAGES:
            raise UserError(f"Unknown stage '{self.stage}'; choose {' or '.join(STAGES)}.")
        positive = {"steps": self.steps, "checkpoint_freq": self.checkpoint_freq, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, not {value}.")
        if not 0.0 < self.holdout < 1.0:
            raise UserError(f"--holdout must be between 0 and 1, not {self.holdout}.")
        if not 0.0 <= self.lmd <= 1.0:
            raise UserError(f"--lmd must be between 0 and 1, not {self.lmd}.")
        object.__setattr__(self, "test_envs", tuple(self.test_envs))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


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
