"""Dataset scan, decoding, DomainBed splits and registry checks (vl2v.data), on folders made in tmp_path."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset, make_image
from PIL import Image

from vl2v.data import (
    IMAGE_EXTENSIONS,
    all_splits,
    check_image,
    describe_dataset,
    load_rgb,
    scan_dataset,
    seed_hash,
    split_domain,
)
from vl2v.runtime import UserError

# --- helpers ---------------------------------------------------------------------------------------


def domainbed_seed_hash(*args) -> int:
    """DomainBed's misc.seed_hash, written out here independently of vl2v."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def domainbed_split_keys(n: int, trial_seed: int, env_i: int, holdout: float = 0.2) -> tuple[list[int], list[int]]:
    """DomainBed's split_dataset over n items: (out keys, in keys), in shuffled order."""
    keys = list(range(n))
    np.random.RandomState(domainbed_seed_hash(trial_seed, env_i)).shuffle(keys)
    n_out = int(n * holdout)
    return keys[:n_out], keys[n_out:]


def paths(index, indices) -> list[str]:
    return [index.files[i].path for i in indices]


def membership(index, trial_seed: int = 0) -> dict[str, str]:
    """path -> 'env{d}_in' / 'env{d}_out' for every image in a split part."""
    return {index.files[i].path: key for key, idx in all_splits(index, trial_seed).items() for i in idx}


def cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def add_bad_files(class_dir: Path) -> dict[str, str]:
    """Five unreadable files the scan must find; name -> a fragment of the expected reason."""
    class_dir.mkdir(parents=True, exist_ok=True)
    (class_dir / "zero.png").write_bytes(b"")
    big = make_image(class_dir.parent / "tmp_src.png", 7, size=64)
    cut_in_half(big, class_dir / "truncated.png")
    big.unlink()
    jpg = make_image(class_dir.parent / "tmp_src.jpg", 8, size=64)
    cut_in_half(jpg, class_dir / "truncated.jpg")
    jpg.unlink()
    (class_dir / "text.jpg").write_text("not an image at all\n")
    os.symlink(class_dir / "does-not-exist.png", class_dir / "dangling.png")
    return {
        "zero.png": "empty file",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "text.jpg": "cannot identify image file",
        "dangling.png": "broken symlink",
    }


def flat_dataset(root: Path, n_per_domain: tuple[int, ...]) -> Path:
    """root/d{i}/c/<k>.png with n images in domain i (one class)."""
    seed = 0
    for d, n in enumerate(n_per_domain):
        for k in range(n):
            make_image(root / f"d{d}" / "c" / f"{k:03d}.png", seed, size=8)
            seed += 1
    return root


# --- layout ----------------------------------------------------------------------------------------


def test_layout_domains_classes_missing_and_classnames(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, domains=("sketch", "art"), classes=("dog", "Sea_Lion"), per_class=2)
    make_image(root / "photo" / "dog" / "0.png", 100)
    make_image(root / "photo" / "zebra_crossing" / "0.png", 101)
    (root / "photo" / "New folder").mkdir()  # a class folder with no images is not a class
    (root / "art" / "empty_too" / "sub").mkdir(parents=True)
    index = scan_dataset(root)

    assert index.domains == ["art", "photo", "sketch"]
    assert index.classes == ["Sea_Lion", "dog", "zebra_crossing"]
    assert index.classnames == ["Sea Lion", "dog", "zebra crossing"]
    assert index.empty_class_folders == ["art/empty_too", "photo/New folder"]
    assert index.missing_classes == {
        "art": ["zebra_crossing"],
        "photo": ["Sea_Lion"],
        "sketch": ["zebra_crossing"],
    }
    assert index.name == "ds"
    assert index.info is None
    assert len(index.files) == 2 * 2 * 2 + 2
    for f in index.files:  # labels index the union of classes, domains the sorted domains
        domain, cls, _ = f.path.split("/")
        assert index.domains[f.domain] == domain
        assert index.classes[f.label] == cls
    assert [f.domain for f in index.files] == sorted(f.domain for f in index.files)

    summary = describe_dataset(index)
    photo = summary["domains"][1]
    assert photo["name"] == "photo"
    assert photo["classes"] == {"Sea_Lion": 0, "dog": 1, "zebra_crossing": 1}
    assert summary["empty_class_folders"] == ["art/empty_too", "photo/New folder"]
    assert summary["missing_classes"] == index.missing_classes


def test_image_extensions_case_insensitive_hidden_and_non_images_counted(tmp_path):
    root = make_dataset(tmp_path / "ds", domains=("a", "b"), classes=("x",), per_class=1)
    cls = root / "a" / "x"
    names = ["up.JPG", "mixed.Png", "plain.jpeg", "bit.bmp", "anim.gif", "web.webp", "scan.tif", "scan2.TIFF", "pal.Gif"]
    for i, name in enumerate(names):
        fmt = {".jpg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(Path(name).suffix.lower())
        arr = np.full((8, 8, 3), 10 * i, np.uint8)
        Image.fromarray(arr).save(cls / name, format=fmt)
    make_image(cls / ".hidden.png", 1)  # hidden file: 1
    make_image(cls / ".thumbs" / "t.png", 2)  # hidden folder: 1 (its content is not counted again)
    make_image(cls / ".thumbs" / ".deeper" / "t.png", 3)
    make_image(cls / "sub" / ".secret" / "s.png", 4)  # hidden folder below a visible one: 1
    make_image(cls / "sub" / "kept.PNG", 5)
    (cls / "notes.txt").write_text("hello")  # not images: 3
    (cls / "labels.csv").write_text("a,b")
    (cls / "image.png.bak").write_bytes(b"x")
    make_image(root / ".cache" / "x" / "0.png", 6)  # hidden domain folder: not a domain
    make_image(root / "a" / ".ipynb_checkpoints" / "0.png", 7)  # hidden class folder: not a class
    index = scan_dataset(root)

    assert index.domains == ["a", "b"]
    assert index.classes == ["x"]
    found = sorted(Path(f.path).name for f in index.files if f.domain == 0)
    assert found == sorted(["0.png", *names, "kept.PNG"])
    assert index.bad == []
    assert index.ignored == {"hidden": 3, "not_image": 3}
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# --- decoding ----------------------------------------------------------------------------------------


def rgb(path: Path) -> np.ndarray:
    im = load_rgb(path)
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_load_rgb_grayscale_and_one_bit(tmp_path):
    Image.new("L", (3, 2), 77).save(tmp_path / "l.png")
    assert (rgb(tmp_path / "l.png") == 77).all()

    one = Image.new("1", (2, 1), 0)
    one.putpixel((0, 0), 1)
    one.save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    assert rgb(tmp_path / "one.png").tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_load_rgb_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (3, 1), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 255] + [0] * (253 * 3))
    for x in range(3):
        pal.putpixel((x, 0), x)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert rgb(tmp_path / "p.png").tolist() == [[[10, 20, 30], [200, 100, 50], [0, 0, 255]]]

    pal.save(tmp_path / "pt.png", transparency=1)  # palette index 1 is transparent
    opened = Image.open(tmp_path / "pt.png")
    assert opened.mode == "P" and "transparency" in opened.info
    assert rgb(tmp_path / "pt.png").tolist() == [[[10, 20, 30], [255, 255, 255], [0, 0, 255]]]

    pal.save(tmp_path / "pt.gif", transparency=0)
    assert rgb(tmp_path / "pt.gif").tolist() == [[[255, 255, 255], [200, 100, 50], [0, 0, 255]]]


def test_load_rgb_alpha_composited_over_white(tmp_path):
    arr = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    Image.fromarray(arr, "RGBA").save(tmp_path / "rgba.png")
    out = rgb(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent red -> white
    assert out[0, 1].tolist() == [0, 0, 255]  # opaque blue kept
    assert np.abs(out[0, 2] - 127).max() <= 1  # half-transparent black over white -> mid grey

    Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert rgb(tmp_path / "la.png").tolist() == [[[255, 255, 255], [50, 50, 50]]]


def test_load_rgb_cmyk_jpeg(tmp_path):
    Image.new("RGB", (16, 16), (220, 30, 40)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = rgb(tmp_path / "cmyk.jpg")
    assert out.shape == (16, 16, 3)
    assert np.abs(out - [220, 30, 40]).max() <= 6


def test_load_rgb_16_bit_grayscale_scaled_to_8_bit(tmp_path):
    arr = np.array([[0, 257 * 128, 65535, 257 * 10]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert rgb(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 128, 255, 10]
    assert (rgb(tmp_path / "g16.png")[..., 0] == rgb(tmp_path / "g16.png")[..., 2]).all()

    # A dark 16-bit image (every value <= 255 of 65535) stays dark: the scale depends on the
    # format, not on the image's content.
    Image.fromarray(np.array([[0, 128, 255]], np.uint16)).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode == "I;16"
    assert rgb(tmp_path / "dark16.png")[0, :, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("orientation", [6, 8])
def test_load_rgb_applies_exif_orientation(tmp_path, orientation):
    w, h = 40, 24
    arr = np.full((h, w, 3), 128, np.uint8)
    arr[:8, :8] = (255, 0, 0)  # stored top-left corner: red
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = rgb(tmp_path / "o.jpg")
    assert out.shape == (w, h, 3)  # displayed size is transposed: h wide, w tall
    # 6: rotate 90° clockwise to display (top-left -> top-right); 8: counter-clockwise (-> bottom-left)
    expected = np.rot90(arr, k=-1 if orientation == 6 else 1)
    red = [255, 0, 0]
    corner = (slice(2, 6), slice(h - 6, h - 2)) if orientation == 6 else (slice(w - 6, w - 2), slice(2, 6))
    assert (expected[corner] == red).all()
    assert np.abs(out[corner] - red).max() <= 30
    assert np.abs(out[w // 2, h // 2] - 128).max() <= 10
    for y, x in [(2, 2), (2, h - 3), (w - 3, 2), (w - 3, h - 3)]:  # only the expected corner is red
        assert np.abs(out[y, x] - expected[y, x]).max() <= 30


# --- unreadable files ----------------------------------------------------------------------------


def test_unreadable_files_listed_with_reasons_and_excluded_everywhere(tmp_path):
    root = make_dataset(tmp_path / "ds", domains=("art", "photo"), classes=("cat", "dog"), per_class=3)
    reasons = add_bad_files(root / "art" / "cat")
    index = scan_dataset(root)

    bad = {Path(f.path).name: f.error for f in index.bad}
    assert set(bad) == set(reasons)
    for name, fragment in reasons.items():
        assert fragment in bad[name], (name, bad[name])
    good_paths = set(paths(index, index.good))
    assert len(good_paths) == 12
    assert not any(Path(p).name in reasons for p in good_paths)
    parts = all_splits(index, trial_seed=0)
    in_any = [p for idx in parts.values() for p in paths(index, idx)]
    assert sorted(in_any) == sorted(good_paths)  # every good image in exactly one part, no bad one

    summary = describe_dataset(index)
    assert {Path(s["path"]).name: s["reason"] for s in summary["skipped"]} == bad
    art = summary["domains"][0]
    assert art["images"] == 6 and art["classes"] == {"cat": 3, "dog": 3}
    assert art["in"] + art["out"] == 6

    with pytest.raises(UserError) as e:
        scan_dataset(root, strict=True)
    message = str(e.value)
    assert "5 unreadable image(s)" in message and "--strict" in message
    for name in reasons:
        assert f"art/cat/{name}" in message


def test_check_image_of_a_good_file_gives_no_error_and_the_bytes_hash(tmp_path):
    for path in (make_image(tmp_path / "ok.png", 0), make_image(tmp_path / "ok.jpg", 0, size=64)):
        assert check_image(path) == (None, hashlib.sha256(path.read_bytes()).hexdigest())


def test_scan_hashes_each_file_it_decodes_and_the_fingerprint_ignores_mtimes(tmp_path):
    root = make_dataset(tmp_path / "ds", domains=("a", "b"), classes=("x",), per_class=2)
    (root / "a" / "x" / "text.jpg").write_text("not an image at all\n")
    index = scan_dataset(root)
    assert {f.path: f.sha256 for f in index.files} == {
        f.path: hashlib.sha256((root / f.path).read_bytes()).hexdigest() for f in index.files
    }  # the unreadable file too: its bytes were read
    assert [f.sha256 for f in scan_dataset(root, check_images=False).files] == [None] * 5  # no reading

    fingerprint = index.fingerprint()
    os.utime(root / "a" / "x" / "0.png", ns=(1, 1))
    assert scan_dataset(root, check_images=False).fingerprint() == fingerprint
    (root / "b" / "x" / "1.png").write_bytes(b"longer" + (root / "b" / "x" / "1.png").read_bytes())
    resized = scan_dataset(root, check_images=False).fingerprint()
    assert resized != fingerprint
    (root / "b" / "x" / "1.png").rename(root / "b" / "x" / "2.png")
    assert scan_dataset(root, check_images=False).fingerprint() != resized


def test_unreadable_file_leaves_every_other_split_membership_unchanged(tmp_path):
    root = flat_dataset(tmp_path / "ds", (20, 15))
    before = membership(scan_dataset(root))
    victim = "d0/c/004.png"
    (root / victim).write_bytes(b"garbage")
    index = scan_dataset(root)
    after = membership(index)

    assert [f.path for f in index.bad] == [victim]
    assert victim in before and victim not in after
    assert after == {p: part for p, part in before.items() if p != victim}
    # the test has teeth: splitting only the 19 good images would move others between parts
    out_keys, _ = domainbed_split_keys(19, 0, 0)
    good0 = [f.path for f in index.files if f.domain == 0 and f.error is None]
    naive_out = {good0[k] for k in out_keys}
    assert naive_out != {p for p, part in after.items() if part == "env0_out"}


# --- unicode and spaces ----------------------------------------------------------------------------


def test_unicode_and_spaces_in_names_end_to_end(tmp_path):
    root = tmp_path / "数据 set"
    make_dataset(root, domains=("Real World", "Ölgemälde"), classes=("chat noir", "犬"), per_class=3)
    make_image(root / "Real World" / "chat noir" / "фото 1 é.JPG", 50)
    index = scan_dataset(root)
    assert index.name == "数据 set"
    assert index.domains == ["Real World", "Ölgemälde"]
    assert index.classes == ["chat noir", "犬"]
    assert index.classnames == ["chat noir", "犬"]
    assert "Real World/chat noir/фото 1 é.JPG" in paths(index, index.good)
    assert index.bad == []
    summary = describe_dataset(index, trial_seed=1)
    assert [d["name"] for d in summary["domains"]] == ["Real World", "Ölgemälde"]
    assert summary["domains"][0]["classes"] == {"chat noir": 4, "犬": 3}
    for d, dom in enumerate(summary["domains"]):
        assert dom["out_paths"] == paths(index, split_domain(index, d, 1)[1])
        for p in dom["out_paths"]:
            assert (root / p).is_file()
    assert index.domain_index("Ölgemälde") == 1


# --- DomainBed splits ------------------------------------------------------------------------------


def test_seed_hash_matches_domainbed_literals_and_independent_rule():
    # Literals computed once with DomainBed's rule (md5 of str((trial_seed, env_i))) and pasted here.
    assert seed_hash(0, 0) == 894182419
    assert seed_hash(0, 1) == 1514274641
    assert seed_hash(1, 0) == 785910682
    assert seed_hash(1, 2) == 1981683110
    for t in range(4):
        for e in range(6):
            assert seed_hash(t, e) == domainbed_seed_hash(t, e)
    assert seed_hash(np.int64(1), np.int64(2)) == seed_hash(1, 2)  # NumPy 2 ints print differently


# (trial seed, n) -> DomainBed's "out" keys of environment 0, in shuffled order (pasted literals).
OUT_KEYS_ENV0 = {(0, 10): [2, 3], (0, 20): [7, 6, 10, 17], (1, 10): [3, 7], (1, 20): [8, 9, 18, 15]}


@pytest.mark.parametrize(("trial_seed", "n"), sorted(OUT_KEYS_ENV0))
def test_split_matches_domainbed_exactly(tmp_path, trial_seed, n):
    assert domainbed_split_keys(n, trial_seed, 0)[0] == OUT_KEYS_ENV0[trial_seed, n]
    root = flat_dataset(tmp_path / "ds", (n, 7, n))
    index = scan_dataset(root)
    offset = 0
    for d, size in enumerate((n, 7, n)):
        want_out, want_in = domainbed_split_keys(size, trial_seed, d)
        in_, out = split_domain(index, d, trial_seed)
        assert out.tolist() == [offset + k for k in want_out]
        assert in_.tolist() == [offset + k for k in want_in]
        offset += size
    in0, out0 = split_domain(index, 0, trial_seed)
    assert [int(index.files[i].path[-7:-4]) for i in out0] == OUT_KEYS_ENV0[trial_seed, n]
    assert len(out0) == n // 5 and len(in0) == n - n // 5
    splits = all_splits(index, trial_seed)
    assert sorted(splits) == ["env0_in", "env0_out", "env1_in", "env1_out", "env2_in", "env2_out"]
    assert splits["env2_out"].tolist() == split_domain(index, 2, trial_seed)[1].tolist()


def test_split_holdout_fraction_and_determinism(tmp_path):
    index = scan_dataset(flat_dataset(tmp_path / "ds", (10, 10)))
    for holdout in (0.1, 0.25, 0.3, 0.5):
        in_, out = split_domain(index, 1, 3, holdout)
        want_out, want_in = domainbed_split_keys(10, 3, 1, holdout)
        assert out.tolist() == [10 + k for k in want_out] and len(out) == int(10 * holdout)
        assert in_.tolist() == [10 + k for k in want_in]
    a, b = split_domain(index, 0, 0), split_domain(index, 0, 0)
    assert all((x == y).all() for x, y in zip(a, b))
    assert set(split_domain(index, 0, 0)[1].tolist()) != set(split_domain(index, 0, 1)[1].tolist())


def test_within_domain_order_equals_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "ds"
    layout = [
        "b/2.png", "b/10.png", "b/B.png", "b/a.png", "b/sub/x.png", "b/sub1/deeper/w.jpg", "b/sub1/y.png",
        "b/sub 2/z.PNG", "b/sub-3/q.jpeg", "b/_u.png", "C/1.png", "C/Z/0.png", "a/only.JPG", "a b/k.png",
    ]  # fmt: skip
    for i, rel in enumerate(layout):
        for domain in ("dom1", "dom2"):
            make_image(root / domain / rel, i, size=8)
    make_image(root / "dom2" / "extra" / "e.png", 99, size=8)  # a class only dom2 has
    index = scan_dataset(root)
    for d, domain in enumerate(index.domains):
        folder = ImageFolder(str(root / domain))
        want = [Path(p).relative_to(root).as_posix() for p, _ in folder.samples]
        got = [f.path for f in index.files if f.domain == d]
        assert got == want
        assert len(got) == len(layout) + d
    assert index.classes == ["C", "a", "a b", "b", "extra"]


# --- DomainBed registry ----------------------------------------------------------------------------


PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


def test_pacs_folder_recognised_and_image_count_warned(tmp_path, caplog):
    root = make_dataset(tmp_path / "PACS", domains=PACS_DOMAINS, classes=("dog", "horse"), per_class=1)
    with caplog.at_level(logging.WARNING, logger="vl2v.data"):
        index = scan_dataset(root)
    assert index.info is not None and index.info.name == "PACS"
    assert describe_dataset(index)["domainbed"] == "PACS"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "PACS: 8 images found, DomainBed has 9991" in warnings
    assert "PACS: 2 classes found, DomainBed has 7" in warnings


@pytest.mark.parametrize("folder", ["office_home", "OFFICE_HOME", "OfficeHome", "officehome"])
def test_office_home_folder_recognised_case_insensitively(tmp_path, folder):
    domains = ("Art", "Clipart", "Product", "Real World")
    index = scan_dataset(make_dataset(tmp_path / folder, domains=domains, classes=("Alarm_Clock",), per_class=1))
    assert index.info is not None and index.info.name == "OfficeHome"
    assert index.classnames == ["Alarm Clock"]


def test_registry_missing_domain_is_a_user_error_naming_it(tmp_path):
    root = make_dataset(tmp_path / "pacs", domains=PACS_DOMAINS[:3], classes=("dog",), per_class=1)
    with pytest.raises(UserError, match=r"looks like PACS but lacks domain folder\(s\): sketch\."):
        scan_dataset(root)


def test_unregistered_folder_name_has_no_registry_checks(tmp_path, caplog):
    root = make_dataset(tmp_path / "PACS_small", domains=("art", "photo"), classes=("dog",), per_class=1)
    with caplog.at_level(logging.WARNING, logger="vl2v.data"):
        index = scan_dataset(root)
    assert index.info is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- bad input ---------------------------------------------------------------------------------------


def test_wrong_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"Dataset folder not found: .*nope\. Pass ROOT laid out as ROOT/<domain>/<class>/<image>\."):
        scan_dataset(tmp_path / "nope")


def test_file_instead_of_folder_is_a_user_error(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(UserError, match=r"data\.zip is a file; pass the dataset folder"):
        scan_dataset(f)


@pytest.mark.parametrize("domains", [(), ("only",)])
def test_fewer_than_two_domains_is_a_user_error(tmp_path, domains):
    root = tmp_path / "ds"
    root.mkdir()
    for d in domains:
        make_image(root / d / "c" / "0.png", 0)
    (root / ".hidden_domain").mkdir()
    (root / "README.txt").write_text("a file is not a domain")
    with pytest.raises(UserError, match=rf"has {len(domains)} domain folder\(s\).*at least two"):
        scan_dataset(root)


def test_empty_dataset_is_a_user_error(tmp_path):
    root = tmp_path / "ds"
    for d in ("a", "b"):
        (root / d / "cls").mkdir(parents=True)
        (root / d / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"No images found in .*ds \(extensions: \.jpg, \.jpeg"):
        scan_dataset(root)
