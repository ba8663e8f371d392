"""Training settings: defaults < dataset overrides < --config JSON < flags; bad keys and values are UserErrors."""

from __future__ import annotations

import json

import pytest

from vl2v.config import TrainConfig, resolve_config
from vl2v.data import DOMAINBED, domainbed_info
from vl2v.runtime import UserError

DOMAINNET = DOMAINBED["DomainNet"]
NO_FLAGS = dict.fromkeys(["student", "lr", "steps", "checkpoint_freq", "batch_size", "swad", "test_envs"])  # CLI: None = not given


def write(tmp_path, values: dict, name: str = "cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return path


def test_defaults_are_the_papers():
    cfg = resolve_config(None, None, NO_FLAGS)
    assert cfg == TrainConfig()
    assert (cfg.method, cfg.student, cfg.pretrained, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("align", "vits", True, 5e-5, 0.0, 32)
    assert (cfg.steps, cfg.checkpoint_freq, cfg.freeze_bn, cfg.lmd, cfg.holdout, cfg.swad) == (5001, 200, True, 0.5, 0.2, True)
    assert (cfg.n_converge, cfg.n_tolerance, cfg.tolerance_ratio) == (3, 6, 0.3)
    assert cfg.test_envs == () and not cfg.deploy
    assert (cfg.kd_temperature, cfg.kd_weight, cfg.model_save, cfg.log) == (4.0, 0.5, 100, "none")


def test_dataset_overrides_domainnet_and_only_domainnet():
    assert domainbed_info("DomainNet") is DOMAINNET and domainbed_info("domain_net") is DOMAINNET
    cfg = resolve_config(DOMAINNET, None, NO_FLAGS)
    assert (cfg.steps, cfg.checkpoint_freq) == (15001, 1000)
    assert cfg.lr == 5e-5 and cfg.batch_size == 32  # the rest stays at the defaults
    for name in ("PACS", "VLCS", "OfficeHome", "TerraIncognita"):
        cfg = resolve_config(DOMAINBED[name], None, {})
        assert (cfg.steps, cfg.checkpoint_freq) == (5001, 200), name


def test_config_file_beats_dataset_overrides_and_flags_beat_the_file(tmp_path):
    path = write(tmp_path, {"steps": 300, "lr": 1e-3, "batch_size": 8, "swad": False, "test_envs": ["sketch"]})
    cfg = resolve_config(DOMAINNET, path, NO_FLAGS)
    assert (cfg.steps, cfg.checkpoint_freq, cfg.lr, cfg.batch_size, cfg.swad) == (300, 1000, 1e-3, 8, False)
    assert cfg.test_envs == ("sketch",)  # JSON lists become tuples

    flags = {**NO_FLAGS, "steps": 20, "swad": True, "student": "test_vit", "test_envs": ("art", "photo")}
    cfg = resolve_config(DOMAINNET, path, flags)
    assert (cfg.steps, cfg.checkpoint_freq, cfg.lr, cfg.batch_size, cfg.swad, cfg.student) == (20, 1000, 1e-3, 8, True, "test_vit")
    assert cfg.test_envs == ("art", "photo")

    # a flag left at None does not hide the file; a falsy flag (False, 0.0) still counts
    cfg = resolve_config(None, write(tmp_path, {"swad": True, "weight_decay": 0.1}, "b.json"), {"swad": False, "weight_decay": 0.0, "lr": None})
    assert (cfg.swad, cfg.weight_decay, cfg.lr) == (False, 0.0, 5e-5)


def test_unknown_key_in_config_file_suggests(tmp_path):
    path = write(tmp_path, {"steps": 10, "chekpoint_freq": 5})
    with pytest.raises(UserError) as e:
        resolve_config(None, path, {})
    msg = str(e.value)
    assert str(path) in msg and "unknown setting 'chekpoint_freq'" in msg and "Did you mean 'checkpoint_freq'?" in msg


def test_unreadable_config_files(tmp_path):
    with pytest.raises(UserError, match="--config file not found"):
        resolve_config(None, tmp_path / "missing.json", {})
    bad = tmp_path / "bad.json"
    bad.write_text("{steps: 3")
    with pytest.raises(UserError, match="is not valid JSON"):
        resolve_config(None, bad, {})


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"steps": 0}, "--steps must be ≥ 1, not 0"),
        ({"checkpoint_freq": -5}, "--checkpoint-freq must be ≥ 1"),
        ({"batch_size": 0}, "--batch-size must be ≥ 1"),
        ({"eval_batch_size": 0}, "--eval-batch-size must be ≥ 1"),
        ({"holdout": 0.0}, "--holdout must be between 0 and 1"),
        ({"holdout": 1.0}, "--holdout must be between 0 and 1"),
        ({"lmd": 1.5}, "--lmd must be between 0 and 1, not 1.5"),
        ({"lmd": -0.1}, "--lmd must be between 0 and 1"),
        ({"method": "ermm"}, "Unknown method 'ermm'. Did you mean 'erm'?"),
        ({"kd_weight": 1.5}, "--kd-weight must be between 0 and 1"),
        ({"kd_temperature": 0.0}, "--kd-temperature must be > 0"),
        ({"log": "wandb"}, "--log must be one of none, tensorboard"),
        ({"test_envs": ["none", "art"]}, "--test-env none (train on every domain) cannot be combined"),
        ({"steps": "100"}, "steps"),
        ({"lr": "fast"}, "lr"),
        ({"steps": 2.5}, "steps"),
        ({"swad": "yes"}, "swad"),
        ({"test_envs": "art"}, "test_envs"),
        ({"model_kwargs": [1]}, "model_kwargs"),
        ({"image_size": "big"}, "image_size"),
    ],
)
def test_invalid_values_are_user_errors(tmp_path, values, fragment):
    with pytest.raises(UserError) as e:
        resolve_config(None, write(tmp_path, values), {})
    assert fragment in str(e.value)
    with pytest.raises(UserError) as e:  # the same through flags
        resolve_config(None, None, values)
    assert fragment in str(e.value)


def test_unknown_flag_is_a_user_error():
    with pytest.raises(UserError, match="unknown setting 'stepz'.*Did you mean 'steps'"):
        resolve_config(None, None, {"stepz": 3})


def test_whole_numbers_are_accepted_for_float_settings(tmp_path):
    cfg = resolve_config(None, write(tmp_path, {"lr": 1, "weight_decay": 0, "lmd": 1, "image_size": 64}), {})
    assert (cfg.lr, cfg.weight_decay, cfg.lmd, cfg.image_size) == (1.0, 0.0, 1.0, 64)
    assert json.loads(json.dumps(cfg.to_json()))["lr"] == 1.0


def test_test_env_none_is_a_deployment_run():
    cfg = resolve_config(None, None, {"test_envs": ("none",)})
    assert cfg.deploy and cfg.test_envs == ("none",)


def test_every_flag_has_help_and_methods_name_registered_methods():
    import dataclasses

    from vl2v.methods import METHODS

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"].endswith("."), f.name
        assert set(f.metadata["methods"]) <= set(METHODS), f.name
