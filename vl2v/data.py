"""Datasets in DomainBed's layout (ROOT/<domain>/<class>/<image>): scan, decode, split, transform."""

from __future__ import annotations

import difflib
import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from vl2v.runtime import Progress, UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class DomainBedInfo:
    """What DomainBed says a dataset holds; folders found on disk are checked against it."""

    name: str
    folders: tuple[str, ...]  # folder names it is recognised by (DomainBed's own first)
    domains: tuple[str, ...]
    num_classes: int
    num_images: int
    steps: int = 5001
    checkpoint_freq: int = 200


DOMAINBED = {
    info.name: info
    for info in (
        DomainBedInfo("PACS", ("PACS",), ("art_painting", "cartoon", "photo", "sketch"), 7, 9991),
        DomainBedInfo("VLCS", ("VLCS",), ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5, 10729),
        DomainBedInfo(
            "OfficeHome",
            ("office_home", "OfficeHome"),
            ("Art", "Clipart", "Product", "Real World"),
            65,
            15588,
        ),
        DomainBedInfo(
            "TerraIncognita",
            ("terra_incognita", "TerraIncognita"),
            ("location_100", "location_38", "location_43", "location_46"),
            10,
            24788,
        ),
        DomainBedInfo(
            "DomainNet",
            ("domain_net", "DomainNet"),
            ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
            345,
            586575,
            steps=15001,
            checkpoint_freq=1000,
        ),
    )
}


def domainbed_info(folder_name: str) -> DomainBedInfo | None:
    """The registry entry a dataset folder name refers to (case-insensitive), if any."""
    for info in DOMAINBED.values():
        if folder_name.lower() in (f.lower() for f in info.folders):
            return info
    return None


def suggest(name: str, choices: list[str]) -> str:
    """' Did you mean X?' for the nearest choice, or ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


@dataclass
class ImageFile:
    path: str  # relative to the dataset root, POSIX separators: the key everywhere
    domain: int
    label: int
    size: int
    mtime_ns: int
    error: str | None = None  # why it cannot be used; None for a good image
    sha256: str | None = None  # hex digest of the file's bytes, once read (`check_image_files`)


@dataclass
class DatasetIndex:
    """Every image candidate of a dataset in DomainBed's order (domain, then torchvision's
    ImageFolder order within it). Unreadable files stay listed with an `error` so that the
    DomainBed split stays exact; every consumer uses `good` / the split functions."""

    root: Path
    name: str
    domains: list[str]
    classes: list[str]
    files: list[ImageFile]
    ignored: dict[str, int] = field(default_factory=dict)
    missing_classes: dict[str, list[str]] = field(default_factory=dict)
    info: DomainBedInfo | None = None
    empty_class_folders: list[str] = field(default_factory=list)  # "domain/class" folders without images

    @property
    def good(self) -> np.ndarray:
        """Indices of usable images."""
        return np.array([i for i, f in enumerate(self.files) if f.error is None], dtype=np.int64)

    @property
    def bad(self) -> list[ImageFile]:
        return [f for f in self.files if f.error is not None]

    @property
    def classnames(self) -> list[str]:
        """Prompt names: folder names with `_` as a space, case kept."""
        return [c.replace("_", " ") for c in self.classes]

    def domain_index(self, name: str) -> int:
        if name not in self.domains:
            raise UserError(
                f"Unknown domain '{name}' in {self.root}.{suggest(name, self.domains)} "
                f"Domains: {', '.join(self.domains)}."
            )
        return self.domains.index(name)

    def fingerprint(self) -> str:
        """sha256 over every candidate's relative path and size: which files the dataset lists.
        Modification times are left out, so a copy of the dataset has the same fingerprint; the
        cache checks each image's content on its own (`vl2v.cache.match_rows`)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.path}\t{f.size}\n".encode())
        return h.hexdigest()


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_class_dir(class_dir: Path, ignored: dict[str, int]) -> list[Path]:
    """Image files below a class folder, in torchvision ImageFolder's order
    (sorted os.walk roots, then sorted file names)."""
    walked = []
    for root, dirs, names in os.walk(class_dir, followlinks=True):
        hidden_dirs = [d for d in dirs if _is_hidden(d)]
        ignored["hidden"] = ignored.get("hidden", 0) + len(hidden_dirs)
        dirs[:] = [d for d in dirs if not _is_hidden(d)]  # pruned before descending into them
        walked.append((root, names))
    found = []
    for root, names in sorted(walked):  # sorted roots, as sorted(os.walk(...)) in torchvision
        for name in sorted(names):
            if _is_hidden(name):
                ignored["hidden"] = ignored.get("hidden", 0) + 1
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(root) / name)
            else:
                ignored["not_image"] = ignored.get("not_image", 0) + 1
    return found


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _check_root(root: Path) -> None:
    if not root.exists():
        raise UserError(f"Dataset folder not found: {root}. Pass ROOT laid out as ROOT/<domain>/<class>/<image>.")
    if not root.is_dir():
        raise UserError(f"{root} is a file; pass the dataset folder (ROOT/<domain>/<class>/<image>).")


def scan_dataset(
    root: Path | str, *, check_images: bool = True, strict: bool = False, progress: Progress | None = None
) -> DatasetIndex:
    """Index a dataset folder; with `check_images`, decode every image to find unreadable ones."""
    root = Path(root).expanduser().resolve()
    _check_root(root)
    domains = _subdirs(root)
    if len(domains) < 2:
        raise UserError(
            f"{root} has {len(domains)} domain folder(s) ({', '.join(domains) or 'none'}); "
            "leave-one-domain-out needs at least two: ROOT/<domain>/<class>/<image>."
        )
    ignored: dict[str, int] = {}
    listed = {(d, c): _list_class_dir(root / d / c, ignored) for d in domains for c in _subdirs(root / d)}
    # A class folder without images (say an empty "New folder") is not a class: reported, ignored.
    empty = [f"{d}/{c}" for (d, c), paths in listed.items() if not paths]
    per_domain = {d: [c for (dd, c), paths in listed.items() if dd == d and paths] for d in domains}
    classes = sorted(set().union(*per_domain.values()))
    files = []
    for d_idx, domain in enumerate(domains):
        for cls in per_domain[domain]:
            for path in listed[(domain, cls)]:
                files.append(_image_file(root, path, d_idx, classes.index(cls)))
    if not files:
        raise UserError(f"No images found in {root} (extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    index = DatasetIndex(
        root=root,
        name=root.name,
        domains=domains,
        classes=classes,
        files=files,
        ignored=ignored,
        missing_classes={d: [c for c in classes if c not in per_domain[d]] for d in domains},
        info=domainbed_info(root.name),
        empty_class_folders=empty,
    )
    index.missing_classes = {d: m for d, m in index.missing_classes.items() if m}
    if check_images:
        check_image_files(index, progress=progress)
    if strict and index.bad:
        listing = "; ".join(f"{f.path}: {f.error}" for f in index.bad[:5])
        raise UserError(f"{len(index.bad)} unreadable image(s) in {root} (--strict): {listing}")
    _check_registry(index)
    return index


def _image_file(root: Path, path: Path, domain: int, label: int) -> ImageFile:
    rel = path.relative_to(root).as_posix()
    try:
        st = path.stat()
    except OSError:
        return ImageFile(rel, domain, label, 0, 0, "broken symlink")
    return ImageFile(rel, domain, label, st.st_size, st.st_mtime_ns)


def _check_registry(index: DatasetIndex) -> None:
    info = index.info
    if info is None:
        return
    missing = [d for d in info.domains if d not in index.domains]
    if missing:
        raise UserError(
            f"{index.root} looks like {info.name} but lacks domain folder(s): {', '.join(missing)}. "
            f"Expected: {', '.join(info.domains)} (see `vl2v download {info.name}`)."
        )
    if len(index.classes) != info.num_classes:
        log.warning("%s: %d classes found, DomainBed has %d", info.name, len(index.classes), info.num_classes)
    if len(index.files) != info.num_images:
        log.warning("%s: %d images found, DomainBed has %d", info.name, len(index.files), info.num_images)


def check_image(path: Path) -> tuple[str | None, str | None]:
    """(why the file cannot be used or None, sha256 of its bytes or None if unreadable). The bytes
    are read once, hashed, and decoded from memory (JPEG at reduced scale, for speed)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "broken symlink", None
    except OSError as e:
        return f"not a readable file ({e.strerror or type(e).__name__})", None
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return "empty file", digest
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))  # JPEG decodes at 1/8 scale: still reads every byte
            im.load()
    except UnidentifiedImageError:  # its text would name the in-memory buffer, not the file
        return "not a readable image (cannot identify image file)", digest
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"not a readable image ({str(e)[:80] or type(e).__name__})", digest
    return None, digest


def check_image_files(index: DatasetIndex, *, progress: Progress | None = None, threads: int = 4) -> None:
    """Fill `error` and `sha256` of every candidate (PIL and hashlib release the GIL)."""
    todo = [f for f in index.files if f.error is None]
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(todo), 1024):  # bounded queue: memory stays flat on big datasets
            chunk = todo[start : start + 1024]
            for f, (error, digest) in zip(chunk, pool.map(lambda f: check_image(index.root / f.path), chunk)):
                f.error, f.sha256 = error, digest
            if progress:
                progress(start + len(chunk), len(todo))


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes, or None if it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()  # images are small: one read
    except OSError:
        return None


def hash_files(index: DatasetIndex, rows: list[int], threads: int = 4) -> None:
    """Fill `sha256` of `rows` from their bytes alone (no decoding): the cache's slow path."""
    with ThreadPoolExecutor(threads) as pool:
        for r, digest in zip(rows, pool.map(lambda r: file_sha256(index.root / index.files[r].path), rows)):
            index.files[r].sha256 = digest


def load_rgb(path: Path) -> Image.Image:
    """Decode any image to 8-bit RGB: EXIF orientation applied, 16-bit scaled, alpha over white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            # 16-bit modes always span 0..65535 (a dark image must stay dark); a 32-bit "I" image
            # has no fixed range, so it is taken as 16-bit only when it exceeds 8-bit values.
            scale = 257.0 if im.mode != "I" or arr.max() > 255 else 1.0
            im = Image.fromarray((arr / scale).clip(0, 255).astype(np.uint8))
        if im.mode == "P":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return im.convert("RGB")


# --- DomainBed splits ---------------------------------------------------------------------------


def seed_hash(*args: int) -> int:
    """DomainBed's seed_hash: an md5 of the tuple's text. Pass plain Python ints."""
    text = str(tuple(int(a) for a in args))
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % (2**31)


def split_domain(index: DatasetIndex, domain: int, trial_seed: int, holdout: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """DomainBed's (in, out) split of one domain: its candidates shuffled with
    RandomState(seed_hash(trial_seed, domain)); the first int(n * holdout) are "out".
    Returns global indices of the good images in each part."""
    positions = [i for i, f in enumerate(index.files) if f.domain == domain]
    keys = list(range(len(positions)))
    np.random.RandomState(seed_hash(trial_seed, domain)).shuffle(keys)
    n_out = int(len(positions) * holdout)
    good = [index.files[p].error is None for p in positions]
    out = [positions[k] for k in keys[:n_out] if good[k]]
    in_ = [positions[k] for k in keys[n_out:] if good[k]]
    return np.array(in_, dtype=np.int64), np.array(out, dtype=np.int64)


def all_splits(index: DatasetIndex, trial_seed: int, holdout: float = 0.2) -> dict[str, np.ndarray]:
    """{"env{i}_in": indices, "env{i}_out": indices} for every domain (DomainBed's key names)."""
    splits = {}
    for d in range(len(index.domains)):
        splits[f"env{d}_in"], splits[f"env{d}_out"] = split_domain(index, d, trial_seed, holdout)
    return splits


# --- transforms and torch datasets --------------------------------------------------------------


def build_train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """The paper's training augmentation."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(p=0.1),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def build_eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """Resize to size × size, as the paper's evaluation."""
    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(mean, std)])


class ImageDataset(Dataset):
    """Decodes `root/paths[i]` with `transform`. Items: (image, i, ok); a file that fails to decode
    gives a zero image and ok=False instead of killing a long job."""

    def __init__(self, root: Path, paths: list[str], transform, size: tuple[int, int, int]):
        self.root, self.paths, self.transform, self.size = Path(root), paths, transform, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_rgb(self.root / self.paths[i])), i, True
        except (OSError, SyntaxError, ValueError) as e:
            log.warning("cannot decode %s: %s", self.paths[i], e)
            return torch.zeros(self.size), i, False


def describe_dataset(index: DatasetIndex, trial_seed: int = 0, holdout: float = 0.2) -> dict:
    """A JSON-ready description: per-domain counts per class, split sizes and "out" paths, skips."""
    domains = []
    for d, name in enumerate(index.domains):
        in_, out = split_domain(index, d, trial_seed, holdout)
        files = [f for f in index.files if f.domain == d and f.error is None]
        per_class = {c: 0 for c in index.classes}
        for f in files:
            per_class[index.classes[f.label]] += 1
        domains.append(
            {
                "name": name,
                "images": len(files),
                "classes": per_class,
                "in": len(in_),
                "out": len(out),
                "out_paths": [index.files[i].path for i in out],
            }
        )
    return {
        "root": str(index.root),
        "name": index.name,
        "domainbed": index.info.name if index.info else None,
        "classes": index.classes,
        "trial_seed": trial_seed,
        "holdout": holdout,
        "domains": domains,
        "missing_classes": index.missing_classes,
        "skipped": [{"path": f.path, "reason": f.error} for f in index.bad],
        "ignored": index.ignored,
        "empty_class_folders": index.empty_class_folders,
        "fingerprint": index.fingerprint(),
    }
