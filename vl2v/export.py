"""Export a finished run's model as a self-contained bundle folder (see vl2v.bundle, which runs it):
ONNX for onnxruntime (optionally int8 by dynamic quantisation), or TorchScript for torch.jit."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vl2v import __version__, runs, selection
from vl2v.bundle import BUNDLE_FILE, BUNDLE_VERSION, INPUT, JIT_DEPRECATION, MODEL_FILES, OUTPUTS, Preprocessing, file_sha256, is_bundle, load_bundle
from vl2v.data import suggest
from vl2v.evaluate import load_student
from vl2v.runtime import UserError, atomic_write_json

MODELS = ("best", "swad")
QUANTIZE = ("int8",)
INT8_OPS = ("MatMul", "Gemm")  # what --quantize int8 quantises (see quantize_int8)
# The TorchScript-based exporter (dynamo=False): the torch.export-based one needs onnxscript, which
# vl2v does not depend on. Opset 17 is the first with LayerNormalization (one node per ViT norm
# instead of seven) and runs on every onnxruntime of the last years.
OPSET = 17
TRACE_BATCH, CHECK_BATCH = 2, 3  # the self-check runs another batch size than the trace: the batch axis is free
TOLERANCE = 1e-3  # the self-check's bound on |exported − eager| logits, relative to their largest value


class ExportedStudent(nn.Module):
    """The student as one graph: images [B, 3, H, W] -> (logits [B, C], L2-normalised embedding [B, D])."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.student.featurizer(images)
        return self.student.head(features), F.normalize(self.student.head.embed(features), dim=-1)


def export_bundle(run_dir: Path, out: Path, fmt: str, env: str | None = None, model: str | None = None, quantize: str | None = None) -> dict:
    """Export a run's model (see `write_bundle`). `env`: its held-out domain, `none` for the
    deployment model (the default when the run has one); `model`: best or swad (default: swad when
    the run made one). Returns bundle.json."""
    _check_choices(fmt, quantize)
    info = runs.run_info(run_dir)
    env_name, env_path = resolve_env(Path(run_dir), info, env)
    model = resolve_model(env_path, model)
    student, data_cfg = load_student(info, env_path / f"{model}.pt", torch.device("cpu"))
    preprocessing = Preprocessing(data_cfg.image_size, tuple(data_cfg.mean), tuple(data_cfg.std))
    return write_bundle(student, preprocessing, info["dataset"]["classes"], run_provenance(Path(run_dir), info, env_name, env_path, model), out, fmt, quantize)


def write_bundle(student: nn.Module, preprocessing: Preprocessing, classes: list[str], provenance: dict, out: Path, fmt: str,
                 quantize: str | None = None) -> dict:
    """Write a student's bundle to `out` (a temporary folder beside it, renamed when complete) and
    check it, run as `vl2v predict` runs it, against the eager model. Returns bundle.json."""
    _check_choices(fmt, quantize)
    exported = ExportedStudent(student).eval()
    size = preprocessing.input_size
    generator = torch.Generator().manual_seed(0)
    example, check = (torch.randn(n, 3, size, size, generator=generator) for n in (TRACE_BATCH, CHECK_BATCH))
    with torch.no_grad():
        expected = exported(check)
    with staging(Path(out)) as tmp:
        model_file = tmp / MODEL_FILES[fmt]
        (write_onnx if fmt == "onnx" else write_torchscript)(exported, example, model_file)
        if quantize:
            quantize_int8(model_file)
        bundle = {
            "bundle_version": BUNDLE_VERSION,
            "format": fmt,
            "model_file": model_file.name,
            "sha256": file_sha256(model_file),
            "quantize": quantize,
            "classes": list(classes),
            "preprocessing": preprocessing.to_json(),
            "inputs": {INPUT: ["batch", 3, size, size]},
            "outputs": {"logits": ["batch", len(classes)], "embedding": ["batch", expected[1].shape[1]]},
            "provenance": provenance,
            "exporter": {"torch": torch.__version__, "opset": OPSET if fmt == "onnx" else None,
                         "quantized_ops": list(INT8_OPS) if quantize else None},
            "vl2v_version": __version__,
        }
        atomic_write_json(tmp / BUNDLE_FILE, bundle)
        bundle["check"] = check_bundle(tmp, check, expected, strict=quantize is None)
        atomic_write_json(tmp / BUNDLE_FILE, bundle)
    return bundle


def _check_choices(fmt: str, quantize: str | None) -> None:
    if fmt not in MODEL_FILES:
        raise UserError(f"Unknown --format '{fmt}'.{suggest(fmt, list(MODEL_FILES))} Choose from: {', '.join(MODEL_FILES)}.")
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"Unknown --quantize '{quantize}'. Choose from: {', '.join(QUANTIZE)}.")
    if quantize and fmt != "onnx":
        raise UserError(f"--quantize {quantize} is for --format onnx (onnxruntime's dynamic quantisation).")


def resolve_env(run_dir: Path, info: dict, env: str | None) -> tuple[str, Path]:
    """The name and folder of a finished model of the run: `env` (a domain, or `none`), by default
    the deployment model."""
    domains = info["dataset"]["domains"]
    envs = [None, *range(len(domains))]
    finished = [runs.env_name(domains, e) for e in envs if runs.read_final(runs.env_dir(run_dir, e)) is not None]
    if env is None:
        if not runs.env_dir(run_dir, None).exists():
            if not finished:
                raise UserError(f"{run_dir} has no finished model yet; finish it with the command that started it.")
            raise UserError(f"{run_dir} has no deployment model (--test-env none): pass --env, one of: {', '.join(finished)}.")
        env = runs.env_name(domains, None)
    names = [runs.env_name(domains, e) for e in envs]
    if env not in names:
        raise UserError(f"Unknown --env '{env}'.{suggest(env, names)} This run's finished models: {', '.join(finished) or 'none yet'}.")
    env_path = runs.env_dir(run_dir, envs[names.index(env)])
    if env not in finished:
        raise UserError(f"{run_dir} has no finished model for --env {env} ({env_path / 'done.json'} is missing); finish it with the command that started it.")
    return env, env_path


def resolve_model(env_path: Path, model: str | None) -> str:
    if model is None:
        return "swad" if (env_path / "swad.pt").exists() else "best"
    if model not in MODELS:
        raise UserError(f"Unknown --model '{model}'. Choose from: {', '.join(MODELS)}.")
    if not (env_path / f"{model}.pt").exists():
        raise UserError(f"{env_path} has no {model}.pt (a run with --no-swad has no SWAD model); use --model best.")
    return model


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out`, renamed to `out` when the block succeeds (a bundle already
    there is replaced whole, never overwritten in place), removed when it fails."""
    out = out.resolve()
    if out.exists() and not (out.is_dir() and (is_bundle(out) or not any(out.iterdir()))):
        raise UserError(f"--out {out} exists and is not a vl2v bundle; pass a new folder (nothing was written).")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = tmp.with_suffix(".old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter, chosen above
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # constants of the fixed input size; check_bundle tests the rest
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                              output_names=list(OUTPUTS), dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)})
        except ImportError as e:
            raise UserError(f"--format onnx needs the {e.name} package: pip install 'vl2v[export]'.") from None
        except torch.onnx.errors.OnnxExporterError as e:
            raise UserError(f"This student does not export to ONNX opset {OPSET} ({str(e).splitlines()[0]}); try --format torchscript.") from None


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", JIT_DEPRECATION, FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path))  # check_bundle does the check


def quantize_int8(model_file: Path) -> None:
    """Replace an fp32 ONNX model by onnxruntime's dynamic int8 quantisation of its matrix
    products (weights int8, activations quantised per batch at run time), after onnxruntime's
    recommended pre-processing. Convolutions stay fp32: onnxruntime's dynamic ConvInteger runs
    3-5× slower than fp32 on CPU (bench/predict.py, resnet18)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise UserError("--quantize int8 needs onnxruntime: pip install 'vl2v[export]'.") from None
    fp32, prepared = model_file.with_suffix(".fp32.onnx"), model_file.with_suffix(".prepared.onnx")
    model_file.rename(fp32)
    quant_pre_process(fp32, prepared)  # shape inference and graph optimisation
    quantize_dynamic(prepared, model_file, op_types_to_quantize=list(INT8_OPS), weight_type=QuantType.QInt8)
    fp32.unlink()
    prepared.unlink()


def run_provenance(run_dir: Path, info: dict, env_name: str, env_path: Path, model: str) -> dict:
    """What the exported model was trained as, from what, and what its run recorded."""
    cfg = info["config"]
    return {
        "run": str(run_dir.resolve()),
        "held_out": env_name,
        "model": model,
        "method": cfg["method"],
        "student": cfg["student"],
        "pretrained": cfg["pretrained"],
        "teacher": info["teacher"],
        "from_run": info["from_run"],
        "dataset": {k: info["dataset"][k] for k in ("name", "root", "domains", "fingerprint")},
        "recorded": recorded_figures(env_path, model, cfg, info["dataset"]["domains"]),
        "trained_with_vl2v": info.get("vl2v_version"),
    }


def recorded_figures(env_path: Path, model: str, cfg: dict, domains: list[str]) -> dict:
    """The run's own validation figures for the exported model: the SWAD final record, or the
    checkpoint record best.pt was saved at (the rule that saved it: selection.start_checkpoint)."""
    if model == "swad":
        record = runs.read_final(env_path)[selection.SWAD]
    else:
        checkpoints = [r for r in runs.read_records(env_path) if r.get("kind") == "checkpoint"]
        record = selection.start_checkpoint(checkpoints, cfg["model_save"], cfg["steps"] - 1) or checkpoints[-1]
    figures = {k: record[k] for k in ("step", "tr_outacc", "tr_outloss", "test_in_acc", "test_acc") if k in record}
    per_domain = {d: {"in": record[f"env{i}_in_acc"], "out": record[f"env{i}_out_acc"]} for i, d in enumerate(domains) if f"env{i}_in_acc" in record}
    return {**figures, "domains": per_domain} if per_domain else figures


def check_bundle(path: Path, images: torch.Tensor, expected: tuple[torch.Tensor, torch.Tensor], strict: bool) -> dict:
    """Run the written bundle as `vl2v predict` does on seeded random images and compare with the
    eager model; an fp32 bundle that differs beyond TOLERANCE is refused (a trace that did not
    capture the model)."""
    logits, embedding = load_bundle(path, device="cpu")(images.numpy())
    diff_logits = float(np.abs(logits - expected[0].numpy()).max())
    diff_embedding = float(np.abs(embedding - expected[1].numpy()).max())
    scale = max(1.0, float(expected[0].abs().max()))
    if strict and diff_logits > TOLERANCE * scale:
        raise UserError(f"The exported model's logits differ from the eager model's by {diff_logits:.3g} (tracing did not capture this "
                        f"student); try the other --format.")
    return {"images": f"{len(images)} seeded N(0, 1) inputs", "max_abs_diff_logits": diff_logits, "max_abs_diff_embedding": diff_embedding,
            "top1_agreement": float((logits.argmax(1) == expected[0].numpy().argmax(1)).mean())}
