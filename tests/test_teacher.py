"""The CLIP teacher: --teacher specs, model creation and its errors, prompt templates, text embeddings."""

import hashlib
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CLIP
from vl2v.runtime import UserError
from vl2v.teacher import (
    DEFAULT_TEACHER,
    TEMPLATES,
    TeacherSpec,
    build_text_embeddings,
    create_teacher,
    is_built_by,
    load_templates,
    parse_teacher_spec,
    teacher_identity,
)

CPU = torch.device("cpu")


# --- spec parsing -----------------------------------------------------------------------------------


def test_model_pretrained_spec():
    spec = parse_teacher_spec("ViT-B-32:laion2b_s34b_b79k")
    assert spec == TeacherSpec("ViT-B-32", "laion2b_s34b_b79k", None)
    assert str(spec) == "ViT-B-32:laion2b_s34b_b79k"
    assert spec.slug == "ViT-B-32-laion2b_s34b_b79k"
    assert parse_teacher_spec("ViT-B-32") == TeacherSpec("ViT-B-32", None, None)
    assert parse_teacher_spec("ViT-B-32:random") == TeacherSpec("ViT-B-32", "random", None)


def test_url_spec_is_a_teacher_server():
    spec = parse_teacher_spec("http://127.0.0.1:8000/")
    assert spec.remote and not parse_teacher_spec("ViT-B-32:openai").remote
    assert str(spec) == "http://127.0.0.1:8000"
    assert spec.slug == "remote-127.0.0.1_8000"
    assert parse_teacher_spec("https://teacher.example.com").slug == "remote-teacher.example.com"
    assert str(parse_teacher_spec(DEFAULT_TEACHER)) == DEFAULT_TEACHER == "ViT-B-16-quickgelu:openai"


def test_hf_hub_spec():
    spec = parse_teacher_spec("hf-hub:timm/ViT-B-16-SigLIP")
    assert spec == TeacherSpec("hf-hub:timm/ViT-B-16-SigLIP", None, None)
    assert str(spec) == "hf-hub:timm/ViT-B-16-SigLIP"
    assert spec.slug == "hf-hub_timm_ViT-B-16-SigLIP"


def test_config_specs_resolve_to_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "my-clip.json").write_text(json.dumps(TINY_CLIP))
    (tmp_path / "w.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)

    alone = parse_teacher_spec("my-clip.json")
    assert alone == TeacherSpec("my-clip", None, tmp_path / "my-clip.json")
    assert str(alone) == str(tmp_path / "my-clip.json")
    assert alone.slug == "my-clip"

    with_weights = parse_teacher_spec("my-clip.json:w.pt")
    assert with_weights == TeacherSpec("my-clip", str(tmp_path / "w.pt"), tmp_path / "my-clip.json")
    assert str(with_weights) == f"{tmp_path / 'my-clip.json'}:{tmp_path / 'w.pt'}"
    assert with_weights.slug == "my-clip-w"
    assert parse_teacher_spec(str(with_weights)) == with_weights  # the stored form parses back to itself


def test_missing_config_or_weights_file(tmp_path):
    with pytest.raises(UserError, match=r"^Teacher config not found: .*nope\.json$"):
        parse_teacher_spec(str(tmp_path / "nope.json"))
    (tmp_path / "c.json").write_text(json.dumps(TINY_CLIP))
    spec = parse_teacher_spec(f"{tmp_path / 'c.json'}:{tmp_path / 'missing.pt'}")  # read only when needed
    with pytest.raises(UserError, match=r"^Teacher weights not found: .*missing\.pt \(from --teacher .*c\.json:.*missing\.pt\)$"):
        create_teacher(spec, CPU)


# --- create_teacher -------------------------------------------------------------------------------


def test_unknown_model_suggests_the_nearest():
    with pytest.raises(UserError) as e:
        create_teacher("ViT-B-16-quickgel:openai", CPU)
    msg = str(e.value)
    assert msg.startswith("Unknown open_clip model 'ViT-B-16-quickgel'. Did you mean 'ViT-B-16-quickgelu'?")
    assert "open_clip.list_models()" in msg and "\n" not in msg


def test_unknown_pretrained_tag_lists_the_tags():
    with pytest.raises(UserError) as e:
        create_teacher("ViT-B-16-quickgelu:opnai", CPU)
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-16-quickgelu")
    assert "openai" in tags
    assert str(e.value) == (
        "Unknown weights 'opnai' for ViT-B-16-quickgelu. Did you mean 'openai'? Tags: " + ", ".join(tags) + "."
    )


def test_default_teacher_offline_is_a_one_line_download_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    # huggingface_hub reads these at import time: patch the constants as well as the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))  # never find weights cached elsewhere
    with pytest.raises(UserError) as e:
        create_teacher(DEFAULT_TEACHER, CPU)
    msg = str(e.value)
    assert msg.startswith(f"Could not download teacher weights for {DEFAULT_TEACHER} (")
    assert msg.endswith("Place the weights file on disk and pass --teacher MODEL:/path/to/weights.pt.")
    assert "\n" not in msg


def test_config_teacher_loads_its_weights(tiny_teacher):
    teacher = create_teacher(tiny_teacher, CPU)
    saved = torch.load(tiny_teacher.split(".json:")[1], weights_only=True)
    state = teacher.model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert not teacher.model.training
    assert teacher.embed_dim == TINY_CLIP["embed_dim"] == 16
    assert teacher.image_size == (32, 32)
    assert teacher.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init: log(1/0.07)
    assert teacher.random_init is False
    prov = teacher.provenance()
    weights = Path(tiny_teacher.split(".json:")[1])
    assert prov == {
        "teacher": tiny_teacher,
        "identity": {"model": "tiny-clip", "weights": "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()},
        "open_clip_version": open_clip.__version__,
        "embed_dim": 16,
        "logit_scale": teacher.logit_scale,
        "preprocess": str(teacher.preprocess),
        "random_init": False,
    }
    assert "Resize" in prov["preprocess"] and "Normalize" in prov["preprocess"]


def test_random_weights_only_when_asked(tiny_teacher):
    config = tiny_teacher.split(":")[0]
    teacher = create_teacher(f"{config}:random", CPU)
    assert teacher.random_init is True
    assert teacher.provenance()["random_init"] is True
    assert teacher.provenance()["teacher"] == f"{config}:random"
    assert teacher.identity() == {"model": "tiny-clip", "weights": "random"}
    assert create_teacher("ViT-B-32:random", CPU).random_init  # a built-in model too, nothing downloaded
    with pytest.raises(UserError) as e:
        create_teacher(config, CPU)
    assert str(e.value) == f"--teacher {config} names no weights: pass {config}:WEIGHTS.pt, or {config}:random for random weights."


def test_a_teacher_without_a_tag_lists_its_tags():
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-16")
    with pytest.raises(UserError) as e:
        create_teacher("ViT-B-16", CPU)
    assert str(e.value) == (
        f"--teacher ViT-B-16 names no weights: pass one of its pretrained tags ({', '.join(tags)}), "
        "e.g. --teacher ViT-B-16:openai, or ViT-B-16:random for random weights."
    )


# --- identity -------------------------------------------------------------------------------------


def test_identity_is_the_weights_content_not_their_path(tiny_teacher, tmp_path):
    config, weights = tiny_teacher.split(".json:")
    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    identity = teacher_identity(tiny_teacher)
    assert identity == create_teacher(tiny_teacher, CPU).identity()
    assert teacher_identity(f"{config}.json:{moved}") == identity
    assert teacher_identity(f"{config}.json:random") == {"model": "tiny-clip", "weights": "random"}
    built = {"teacher": tiny_teacher, "identity": identity}
    assert is_built_by(built, f"{config}.json:{moved}")
    assert not is_built_by(built, f"{config}.json:random")
    assert not is_built_by(built, "ViT-B-32:laion2b_s34b_b79k")  # another model: told apart without its weights
    assert is_built_by({"teacher": tiny_teacher}, tiny_teacher)  # a cache from before identities: its spec
    torch.save({"x": torch.ones(1)}, moved)
    assert not is_built_by(built, f"{config}.json:{moved}")  # other bytes: another teacher


def test_encode_images_and_texts_are_unit_norm(tiny_teacher):
    teacher = create_teacher(tiny_teacher, CPU)
    torch.manual_seed(1)
    img = teacher.encode_images(torch.randn(3, 3, 32, 32))
    txt = teacher.encode_texts(["a photo of a cat", "a dog", "x"])
    for emb in (img, txt):
        assert emb.shape == (3, 16) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert not torch.allclose(txt[0], txt[1])


# --- templates ------------------------------------------------------------------------------------


def test_template_styles():
    assert load_templates("photo") == ["a photo of a {}"]
    assert load_templates("name") == ["{}"]
    assert load_templates("domains") == ["an art of a {}", "a clipart of a {}", "a photo of a {} product", "a photo of a {}"]
    ensemble = load_templates("imagenet80")
    assert len(ensemble) == 80 and len(set(ensemble)) == 80
    assert all(t.count("{}") == 1 for t in ensemble)
    assert "a photo of a {}." in ensemble
    assert set(TEMPLATES) == {"photo", "name", "domains", "imagenet80"}


def test_unknown_style_suggests():
    with pytest.raises(UserError) as e:
        load_templates("phot")
    msg = str(e.value)
    assert msg.startswith("Unknown prompt style 'phot'. Did you mean 'photo'? Choose one of photo, name, domains, imagenet80")


def test_template_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("  a painting of a {}  \n\nitap of a {}\n", encoding="utf-8")
    assert load_templates(str(path)) == ["a painting of a {}", "itap of a {}"]


@pytest.mark.parametrize(
    "text, bad",
    [
        ("a photo of a {}\na photo\n", "a photo"),
        ("{} and {}\n", "{} and {}"),
        ("\n  \n", "empty file"),
    ],
)
def test_bad_template_file(tmp_path, text, bad):
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_templates(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: every line must be a template with exactly one '{{}}'")
    assert bad in msg


# --- text embeddings ------------------------------------------------------------------------------


def test_build_text_embeddings_by_hand(tiny_teacher):
    teacher = create_teacher(tiny_teacher, CPU)
    classes, templates = ["cat", "dog", "sea lion"], load_templates("domains")
    per_template, class_emb = build_text_embeddings(teacher, classes, templates)
    assert per_template.shape == (3, 4, 16) and class_emb.shape == (3, 16)
    assert per_template.dtype == class_emb.dtype == torch.float32
    torch.testing.assert_close(per_template.norm(dim=-1), torch.ones(3, 4))
    torch.testing.assert_close(class_emb.norm(dim=-1), torch.ones(3))
    for c, name in enumerate(classes):
        rows = []
        for t, template in enumerate(templates):
            row = teacher.encode_texts([template.format(name)])[0]  # one prompt at a time
            torch.testing.assert_close(per_template[c, t], row, atol=1e-5, rtol=0)
            rows.append(row / row.norm())
        mean = sum(rows) / len(rows)
        torch.testing.assert_close(class_emb[c], mean / mean.norm(), atol=1e-5, rtol=0)
    # averaging normalised prompts differs from one prompt: the ensemble matters
    assert not torch.allclose(class_emb[0], per_template[0, 0], atol=1e-3)


def test_build_text_embeddings_in_chunks(tiny_teacher):
    """More than 256 prompts (4 classes × 80 templates) are encoded in chunks, in class-major order."""
    teacher = create_teacher(tiny_teacher, CPU)
    classes, templates = ["a", "b", "c", "d"], load_templates("imagenet80")
    per_template, class_emb = build_text_embeddings(teacher, classes, templates)
    assert per_template.shape == (4, 80, 16)
    torch.testing.assert_close(per_template[3, 79], teacher.encode_texts([templates[79].format("d")])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(per_template[2, 5], teacher.encode_texts([templates[5].format("c")])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(class_emb, F.normalize(per_template.mean(1), dim=-1))
