"""Run an exported bundle (`vl2v export`): ONNX on onnxruntime, TorchScript on torch.jit. Needs
neither timm, open_clip nor vl2v's training code. A bundle is a folder:

    BUNDLE/bundle.json            classes, preprocessing, model file and its sha256, provenance, vl2v version
    BUNDLE/model.onnx             (or model.torchscript.pt) image [B, 3, H, W] float32 ->
                                  logits [B, C], L2-normalised embedding [B, D]
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vl2v.data import IMAGE_EXTENSIONS, check_image, load_rgb
from vl2v.runtime import Progress, UserError, resolve_device

BUNDLE_FILE = "bundle.json"
BUNDLE_VERSION = 1
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT, OUTPUTS = "image", ("logits", "embedding")
# TorchScript works, but torch deprecates it in favour of torch.export: the notice is not the user's concern.
JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


@dataclass(frozen=True)
class Preprocessing:
    """RGB resized to size × size (bilinear, antialiased, no crop), scaled to [0, 1], normalised
    per channel, NCHW float32: vl2v.data.build_eval_transform, in NumPy."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict:
        size = self.input_size
        return {"input_size": size, "resize": {"size": [size, size], "interpolation": "bilinear", "crop": None},
                "scale": "1/255", "mean": list(self.mean), "std": list(self.std), "layout": "NCHW RGB float32"}

    @classmethod
    def from_json(cls, d: dict) -> Preprocessing:
        if d["resize"] != {"size": [d["input_size"]] * 2, "interpolation": "bilinear", "crop": None}:
            raise ValueError(f"unsupported resize {d['resize']}")
        mean, std = tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"])
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")
        return cls(int(d["input_size"]), mean, std)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB image -> [3, H, W] float32."""
        size = self.input_size
        pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return ((pixels - mean) / std).transpose(2, 0, 1)


# (images [B, 3, H, W] float32) -> (logits [B, C], embedding [B, D]), both float32
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Bundle:
    path: Path
    info: dict  # bundle.json
    preprocessing: Preprocessing
    run: Runner

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @property
    def provenance(self) -> dict:
        return self.info["provenance"]

    @property
    def model_file(self) -> Path:
        return self.path / self.info["model_file"]

    @property
    def label(self) -> str:
        """What the bundle holds, e.g. `swad (onnx int8)`."""
        kind = " ".join(filter(None, [self.info["format"], self.info.get("quantize")]))
        return f"{self.provenance.get('model', 'model')} ({kind})"

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B, 3, H, W] preprocessed images -> (logits [B, C], L2-normalised embedding [B, D])."""
        try:
            logits, embedding = self.run(np.ascontiguousarray(images, dtype=np.float32))
        except Exception as e:  # the model file is the user's input: its failures are theirs to fix
            raise UserError(f"{self.model_file} failed on images of shape {list(images.shape)}: {_first_line(e)}") from None
        if logits.shape != (len(images), len(self.classes)):
            raise UserError(f"{self.model_file} gives logits of shape {list(logits.shape)}; {self.path / BUNDLE_FILE} lists {len(self.classes)} classes. Export the bundle again.")
        return logits, embedding


def is_bundle(path: Path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def load_bundle(path: Path, device: str = "auto") -> Bundle:
    """Read and check a bundle folder, and load its model for `device` (auto: CUDA when present)."""
    path = Path(path)
    info = read_bundle_info(path)
    model_file = path / info["model_file"]
    if not model_file.is_file():
        raise UserError(f"{model_file} is missing from the bundle. Export it again with `vl2v export`.")
    if file_sha256(model_file) != info["sha256"]:
        raise UserError(f"{model_file} does not match the sha256 in {path / BUNDLE_FILE} (corrupt or replaced). Export the bundle again.")
    preprocessing = Preprocessing.from_json(info["preprocessing"])
    try:
        if info["format"] == "onnx":
            run = _onnx_runner(model_file, device, preprocessing.input_size)
        else:
            run = _torchscript_runner(model_file, device)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"Cannot load {model_file}: {_first_line(e)}. Export the bundle again.") from None
    return Bundle(path, info, preprocessing, run)


def read_bundle_info(path: Path) -> dict:
    """bundle.json, checked for what the runtime needs."""
    file = Path(path) / BUNDLE_FILE
    if not file.is_file():
        raise UserError(f"{path} is not a vl2v bundle (no {BUNDLE_FILE}). Make one with `vl2v export RUN_DIR --format onnx --out {path}`.")
    try:
        info = json.loads(file.read_text())
        problem = _problem(info)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"not JSON ({e})"
    if problem:
        raise UserError(f"{file} is not a valid bundle description: {problem}. Export the bundle again.")
    return info


def _problem(info) -> str | None:
    """What is wrong with a parsed bundle.json, or None."""
    if not isinstance(info, dict):
        return "not a JSON object"
    missing = [k for k in ("bundle_version", "format", "model_file", "sha256", "classes", "preprocessing", "provenance") if k not in info]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)}"
    if not isinstance(info["bundle_version"], int) or info["bundle_version"] > BUNDLE_VERSION:
        return f"bundle version {info['bundle_version']!r}; this vl2v reads version {BUNDLE_VERSION} (upgrade vl2v)"
    if not isinstance(info["provenance"], dict):
        return "'provenance' must be an object"
    if info["format"] not in MODEL_FILES:
        return f"unknown format {info['format']!r} (onnx or torchscript)"
    if info["model_file"] != MODEL_FILES[info["format"]]:
        return f"model_file {info['model_file']!r} ({info['format']} bundles name it {MODEL_FILES[info['format']]!r})"
    if not isinstance(info["classes"], list) or not info["classes"] or not all(isinstance(c, str) for c in info["classes"]):
        return "'classes' must be a non-empty list of names"
    try:
        Preprocessing.from_json(info["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        return f"bad 'preprocessing' ({type(e).__name__}: {e})"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _onnx_runner(model_file: Path, device: str, size: int) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX bundles run on onnxruntime: pip install 'vl2v[export]'.") from None
    import torch

    dev = resolve_device(device)
    providers = ["CPUExecutionProvider"]
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            if device != "auto":
                raise UserError(f"--device {device}: this onnxruntime has no CUDA support (pip install onnxruntime-gpu), use --device cpu.")
        else:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev.index or 0}))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # one knob (OMP_NUM_THREADS) for both runtimes
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_file), options, providers=providers)
    inputs, outputs = session.get_inputs(), [o.name for o in session.get_outputs()]
    if [i.name for i in inputs] != [INPUT] or outputs != list(OUTPUTS) or inputs[0].shape[1:] != [3, size, size]:
        raise UserError(f"{model_file} takes {[(i.name, i.shape) for i in inputs]} and gives {outputs}, not a {INPUT} [B, 3, {size}, {size}] "
                        f"as bundle.json says, giving {', '.join(OUTPUTS)}. Export the bundle again.")
    return lambda images: tuple(session.run(list(OUTPUTS), {INPUT: images}))


def _torchscript_runner(model_file: Path, device: str) -> Runner:
    import torch

    dev = resolve_device(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", JIT_DEPRECATION, FutureWarning)
        module = torch.jit.load(str(model_file), map_location=dev).eval()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, embedding = module(torch.from_numpy(images).to(dev))
        return logits.float().cpu().numpy(), embedding.float().cpu().numpy()

    return run


# --- images in, predictions out -------------------------------------------------------------------


def find_images(paths: list[Path]) -> list[Path]:
    """Image files as given, and the images in folders (recursively, by extension, hidden ones
    skipped, sorted); each once."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and not f.is_dir()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            found.append(p)
        else:
            raise UserError(f"{p} not found: pass image files or folders of images.")
    if not found:
        raise UserError(f"No images in {', '.join(map(str, paths))} (extensions: {' '.join(IMAGE_EXTENSIONS)}).")
    return list(dict.fromkeys(found))


@dataclass
class BundleOutputs:
    rows: np.ndarray  # [N] positions in the input list of the images that decoded
    logits: np.ndarray  # [N, C]
    skipped: list[tuple[Path, str]]  # (path, reason) of the images that did not decode


def run_bundle(bundle: Bundle, paths: list[Path], batch_size: int = 32, workers: int = 4, progress: Progress | None = None) -> BundleOutputs:
    """The bundle's logits for every image that decodes; the others are skipped with a reason.
    Images decode in `workers` threads (PIL releases the GIL) a batch ahead of the model."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be ≥ 1, not {batch_size}.")
    rows, logits, skipped, done = [], [], [], 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for batch in _ahead(pool, lambda i: _decode(paths[i], bundle.preprocessing), range(len(paths)), batch_size):
            good = [(i, x) for i, (x, _) in batch if x is not None]
            skipped += [(paths[i], reason) for i, (x, reason) in batch if x is None]
            if good:
                rows += [i for i, _ in good]
                logits.append(bundle(np.stack([x for _, x in good]))[0])
            done += len(batch)
            if progress:
                progress(done, len(paths))
    empty = np.zeros((0, len(bundle.classes)), np.float32)
    return BundleOutputs(np.array(rows, dtype=np.int64), np.concatenate(logits) if logits else empty, skipped)


def _decode(path: Path, preprocessing: Preprocessing) -> tuple[np.ndarray | None, str | None]:
    try:
        return preprocessing(load_rgb(path)), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, check_image(path)[0] or f"not a readable image ({_first_line(e)[:80]})"


def _ahead(pool: ThreadPoolExecutor, fn, items, batch_size: int) -> Iterator[list]:
    """Batches of (item, fn(item)) in order, with the next batch already being computed."""
    pending: deque = deque()
    items = list(items)
    for start in range(0, len(items), batch_size):
        pending.append([(i, pool.submit(fn, i)) for i in items[start : start + batch_size]])
        if len(pending) > 1:
            yield [(i, f.result()) for i, f in pending.popleft()]
    while pending:
        yield [(i, f.result()) for i, f in pending.popleft()]


def predict(bundle: Bundle, paths: list[Path], top_k: int = 5, batch_size: int = 32, workers: int = 4,
            progress: Progress | None = None) -> dict:
    """The `top_k` classes of every image with their softmax probabilities, and the skipped images.
    `paths`: image files and folders (see `find_images`)."""
    if top_k < 1:
        raise UserError(f"--top-k must be ≥ 1, not {top_k}.")
    images = find_images(paths)
    out = run_bundle(bundle, images, batch_size, workers, progress)
    if not len(out.rows):
        path, reason = out.skipped[0]
        raise UserError(f"None of the {len(images)} image(s) could be read ({path}: {reason}).")
    shifted = out.logits - out.logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    order = np.argsort(-out.logits, axis=1, kind="stable")[:, :top_k]  # ties: the first class, as argmax
    predictions = [
        {"path": str(images[row]), "top_k": [{"class": bundle.classes[c], "probability": float(probs[n, c])} for c in order[n]]}
        for n, row in enumerate(out.rows)
    ]
    return {"bundle": str(bundle.path), "predictions": predictions, "skipped": [{"path": str(p), "reason": r} for p, r in out.skipped]}
