"""Run directories: resolved config and provenance, per-held-out-domain checkpoints and records.

    RUN/config.json            the resolved TrainConfig, dataset, cache, teacher, the run it came from
    RUN/cache_manifest.json    the manifest of the cache it trained from
    RUN/features/              fast Align's cached featurizer outputs (vl2v.features)
    RUN/env{i}/checkpoint.pt   resume state (model, optimiser, SWAD valley, records), atomic
    RUN/env{i}/best.pt         model with the best training-domain validation accuracy
    RUN/env{i}/swad.pt         the SWAD average
    RUN/env{i}/results.jsonl   one line per validation step, then the final selections
    RUN/env{i}/done.json       the final selections; its presence means the domain is finished
    RUN/env{i}/tensorboard/    training curves, with `--log tensorboard`
A deployment run (`--test-env none`) has one folder, RUN/all/, instead of one per held-out domain.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from vl2v import __version__
from vl2v.config import TrainConfig
from vl2v.data import DatasetIndex
from vl2v.runtime import UserError, atomic_torch_save, atomic_write_bytes, atomic_write_json, load_checkpoint

CONFIG = "config.json"
# Settings that may change between a run and its resumption without changing its results.
RESUMABLE = {"device", "workers", "eval_batch_size", "test_envs", "log", "parallel"}


DEPLOY_DIR = "all"  # the one model of a run with no held-out domain


def env_dir(run_dir: Path, env: int | None) -> Path:
    return Path(run_dir) / (DEPLOY_DIR if env is None else f"env{env}")


def env_name(domains: list[str], env: int | None) -> str:
    """The held-out domain's name; `none` for a deployment run."""
    return "none" if env is None else domains[env]


@contextlib.contextmanager
def training_lock(env_path: Path) -> Iterator[None]:
    """Hold a held-out domain's folder while training it: a second process training the same run
    would overwrite its checkpoints, so it is refused. The operating system releases a killed
    run's lock."""
    env_path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(env_path / ".train.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"Another vl2v process is training {env_path} (it holds {lock.lock_file}). Wait for it to finish, or pass another --run-dir.") from None
    try:
        yield
    finally:
        lock.release()


def run_info(run_dir: Path) -> dict:
    """The config.json of a run directory, or a UserError saying it is not one."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} is not a vl2v run directory (no {CONFIG}). Runs are made by `vl2v align` / `vl2v distill`.")
    return json.loads(path.read_text())


def prepare(run_dir: Path, cfg: TrainConfig, index: DatasetIndex, cache_dir: Path | None, manifest: dict | None, from_run: Path | None,
            views: dict | None = None) -> None:
    """Create the run directory, or check that an existing one was made with the same settings.
    `views`: the cached views it trains on (count, seed), which a resumed run must find the same."""
    run_dir = Path(run_dir)
    info = {
        "config": cfg.to_json(),
        "dataset": {"root": str(index.root), "name": index.name, "domains": index.domains, "classes": index.classes, "fingerprint": index.fingerprint()},
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None,
        "teacher": manifest["provenance"]["teacher"] if manifest else None,
        "from_run": str(Path(from_run).resolve()) if from_run else None,
        "views": views,
        "vl2v_version": __version__,
    }
    if (run_dir / CONFIG).exists():
        old = run_info(run_dir)
        diff = _differences(old, info)
        if diff:
            raise UserError(f"{run_dir} already holds a run with other settings ({'; '.join(diff[:4])}). Pass another --run-dir, or delete it to start over.")
    atomic_write_json(run_dir / CONFIG, info)
    if manifest is not None:
        atomic_write_json(run_dir / "cache_manifest.json", manifest)


def _differences(old: dict, new: dict) -> list[str]:
    # A setting missing from an older vl2v's run did not exist then: that run behaved as its default.
    defaults = json.loads(json.dumps(TrainConfig().to_json()))
    before = {k: old["config"].get(k, defaults.get(k)) for k in new["config"]}
    diff = [f"{k}: {before[k]!r} → {v!r}" for k, v in new["config"].items() if k not in RESUMABLE and before[k] != (list(v) if isinstance(v, tuple) else v)]
    for key in ("dataset", "teacher", "from_run", "views"):
        if old.get(key) != new[key]:
            diff.append(f"{key} differs")
    return diff


def save_state(env_path: Path, model, optimizer, valley, next_step: int, records: list[dict], best: dict | None, scaler=None) -> None:
    state = {
        "step": next_step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "valley": valley.state_dict() if valley is not None else {},
        "records": json.dumps(records),
        "best": json.dumps(best),
        "torch_rng": torch.get_rng_state(),
    }
    atomic_torch_save(state, env_path / "checkpoint.pt")
    write_records(env_path, records)


def load_state(env_path: Path, model, optimizer, valley, scaler=None) -> dict:
    """Restore a checkpoint into model, optimiser, valley and fp16 loss scaler; returns step,
    records and best."""
    path = env_path / "checkpoint.pt"
    if not path.exists():
        env_path.mkdir(parents=True, exist_ok=True)
        return {"step": 0, "records": [], "best": None}
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if valley is not None:
        valley.load_state_dict(state["valley"], template=model)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return {"step": state["step"], "records": json.loads(state["records"]), "best": json.loads(state["best"])}


def write_records(env_path: Path, records: list[dict], finals: list[dict] = ()) -> None:
    lines = [json.dumps({"kind": "checkpoint", **r}) for r in records] + [json.dumps(f) for f in finals]
    atomic_write_bytes(env_path / "results.jsonl", ("\n".join(lines) + "\n").encode())


def final_record(selection: str, domain: str, env: int | None, record: dict) -> dict:
    """The test figures of a selected model: DomainBed's convention (the held-out domain's "in"
    split) and the whole held-out domain beside it (None in a deployment run)."""
    return {
        "kind": "final",
        "selection": selection,
        "test_env": env,
        "test_domain": domain,
        "step": record["step"],
        "test_in_acc": record.get(f"env{env}_in_acc"),
        "test_acc": record.get("test_acc"),
        "tr_outacc": record["tr_outacc"],
        "tr_outloss": record["tr_outloss"],
    }


def write_final(env_path: Path, records: list[dict], finals: list[dict]) -> dict:
    write_records(env_path, records, finals)
    done = {f["selection"]: f for f in finals}
    atomic_write_json(env_path / "done.json", done)
    (env_path / "checkpoint.pt").unlink(missing_ok=True)  # resume state is no longer needed
    return done


def read_final(env_path: Path) -> dict | None:
    path = env_path / "done.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_records(env_path: Path) -> list[dict]:
    path = env_path / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Curves:
    """Training curves as TensorBoard scalars beside results.jsonl (`--log tensorboard`); a no-op
    otherwise. A resumed run purges what its killed predecessor logged after the resume step."""

    def __init__(self, env_path: Path, kind: str, start_step: int):
        self.writer = None
        if kind != "tensorboard":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log tensorboard needs the tensorboard package: pip install 'vl2v[tensorboard]'.") from None
        self.writer = SummaryWriter(str(Path(env_path) / "tensorboard"), purge_step=start_step)

    def add(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if key != "step" and isinstance(value, (int, float)) and value == value:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
