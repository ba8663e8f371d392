"""The offline Digits-DG build: layout, decoding, determinism, pool disjointness, idempotence."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vl2v.demo import digits, sources

PER_CLASS = 3
PINNED_DIGEST = "ce0b671b5597c1447db64daa497226384970ddb602629604df01b7c38208157f"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return digits.build_digits_dg(tmp_path_factory.mktemp("a"), per_class=PER_CLASS, seed=0)


def test_layout_is_exact(built):
    assert built.name == "DigitsDG"
    assert sorted(p.name for p in built.iterdir() if p.is_dir()) == list(digits.DOMAINS)
    for domain in digits.DOMAINS:
        classes = sorted(p.name for p in (built / domain).iterdir())
        assert classes == sorted(sources.CLASS_WORDS)
        for c in classes:
            names = sorted(p.name for p in (built / domain / c).iterdir())
            assert names == [f"{n:04d}.png" for n in range(PER_CLASS)]
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_every_png_is_32x32_rgb(built):
    pngs = sorted(built.rglob("*.png"))
    assert len(pngs) == len(digits.DOMAINS) * 10 * PER_CLASS
    for p in pngs:
        with Image.open(p) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
            assert np.ptp(np.asarray(img)) > 50  # not blank


def test_same_seed_same_bytes_other_seed_other_synth(built, tmp_path):
    again = digits.build_digits_dg(tmp_path / "b", per_class=PER_CLASS, seed=0)
    assert _files(again) == _files(built)
    other = _files(digits.build_digits_dg(tmp_path / "c", per_class=PER_CLASS, seed=1))
    same = _files(built)
    for key in same:
        domain = key.split("/")[0]
        # mnist and uci are real images taken in pool order; the seed varies the synthetic ones.
        assert (other[key] == same[key]) == (domain in ("mnist", "uci")), key


def test_pools_are_disjoint_and_labelled():
    pools = sources.pools()
    _, mnist_y = sources.load_mnist()
    _, uci_y = sources.load_uci()
    mnist_sets = [set(pools.mnist.ravel()), set(pools.mnist_m.ravel()), set(pools.teacher_mnist),
                  set(pools.teacher_val_mnist)]  # fmt: skip
    assert [len(s) for s in mnist_sets] == [1500, 1500, 1700, 300]
    assert sum(len(s) for s in mnist_sets) == len(set().union(*mnist_sets)) == len(mnist_y)
    uci_sets = [set(pools.uci.ravel()), set(pools.teacher_uci), set(pools.teacher_val_uci)]
    assert len(uci_sets[2]) == 100
    assert sum(len(s) for s in uci_sets) == len(set().union(*uci_sets)) == len(uci_y)
    for c in range(10):
        assert (mnist_y[pools.mnist[c]] == c).all() and (mnist_y[pools.mnist_m[c]] == c).all()
        assert (uci_y[pools.uci[c]] == c).all()
    assert not set(sources.DEMO_TEXTURES) & set(sources.TEACHER_TEXTURES)


def test_build_takes_the_demo_pools(built):
    pools = sources.pools()
    mnist_x, _ = sources.load_mnist()
    uci_x, _ = sources.load_uci()
    for c, word in enumerate(sources.CLASS_WORDS):
        for n in range(PER_CLASS):
            got = _pixels(built / "mnist" / word / f"{n:04d}.png")
            assert (got == sources.mnist_image(mnist_x[pools.mnist[c, n]])).all()
            got = _pixels(built / "uci" / word / f"{n:04d}.png")
            assert (got == sources.uci_image(uci_x[pools.uci[c, n]])).all()


def test_teacher_images_never_equal_demo_images(built):
    teacher = digits.teacher_images(seed=0, n_synth=40)
    demo = {d: {_pixels(p).tobytes() for p in (built / d).rglob("*.png")} for d in digits.DOMAINS}
    for kind, (images, labels) in teacher.items():
        assert images.shape[1:] == (32, 32, 3) and len(images) == len(labels)
        assert not {img.tobytes() for img in images} & demo[kind], kind
    assert not {p.tobytes() for p in digits.teacher_patches(0, 20)} & demo["mnist_m"]


def test_teacher_validation_images_are_their_own(built):
    val = digits.teacher_val_images()
    assert sorted(val) == list(digits.DOMAINS)
    train = {img.tobytes() for images, _ in digits.teacher_images(seed=0, n_synth=40).values() for img in images}
    demo = {_pixels(p).tobytes() for p in built.rglob("*.png")}
    for domain, (images, labels) in val.items():
        assert images.shape[1:] == (32, 32, 3) and len(images) == len(labels) >= 100, domain
        assert np.bincount(labels, minlength=10).min() >= 10, domain
        assert not {img.tobytes() for img in images} & (train | demo), domain


def _digest(root: Path) -> str:
    """sha256 of every image's path and decoded pixels (not its PNG bytes: encoders may differ)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(_pixels(p).tobytes())
    return h.hexdigest()


def test_the_build_is_pinned(built):
    # Fails when any image changes: font layout (Pillow's BASIC engine, chosen so that libraqm on the
    # system does not matter), FreeType's rendering, the pools, or the random streams.
    # Bump digits.BUILD_VERSION, then update the digest, when a change is meant.
    assert _digest(built) == PINNED_DIGEST


def test_rebuild_is_skipped_when_parameters_match(built, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(digits, "demo_images", fail)
    assert digits.build_digits_dg(built.parent, per_class=PER_CLASS, seed=0) == built


def test_other_parameters_rebuild_in_place(tmp_path):
    first = digits.build_digits_dg(tmp_path, per_class=2, seed=0)
    second = digits.build_digits_dg(tmp_path, per_class=1, seed=0)
    assert first == second
    assert len(list(second.rglob("*.png"))) == len(digits.DOMAINS) * 10
    assert [p.name for p in tmp_path.iterdir()] == ["DigitsDG"]


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "demo_images", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        digits.build_digits_dg(tmp_path, per_class=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("per_class", [0, digits.max_per_class() + 1])
def test_per_class_out_of_range_is_refused(tmp_path, per_class):
    with pytest.raises(ValueError, match="per_class"):
        digits.build_digits_dg(tmp_path, per_class=per_class)


def test_sample_grid(built, tmp_path):
    out = digits.write_sample_grid(built, tmp_path / "grid.png", per_domain=4)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 50
