"""Runtime plumbing shared by every stage: user errors, devices, seeding, atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Progress callback: (completed, total) -> None. The CLI passes one that drives a rich bar.
Progress = Callable[[int, int], None]


class UserError(Exception):
    """A mistake the user can fix (bad path, flag, cache). The CLI prints it in one line, exit 2."""


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch() -> Launch:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ
    return Launch(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def process_group(device: torch.device | None = None) -> None:
    """Join torchrun's process group once: gloo for CPU tensors, and NCCL for CUDA ones when this
    process trains on a GPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")


def barrier() -> None:
    """Wait for every torchrun process (a no-op in a single process)."""
    if not launch().distributed:
        return
    import torch.distributed as dist

    process_group()
    dist.barrier()


def all_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over every torchrun process."""
    import torch.distributed as dist

    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present (under torchrun, the GPU of this local rank), else CPU;
    `cpu`, `cuda`, `cuda:N` are taken as given."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", launch().local_rank % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine. Use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"Unsupported device '{name}'. Use auto, cpu, cuda or cuda:N.")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--precision` (None means full fp32). Half precision needs CUDA."""
    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise UserError(f"Unknown --precision '{precision}'. Choose one of: {', '.join(dtypes)}.")
    if dtypes[precision] is not None and device.type != "cuda":
        raise UserError(f"--precision {precision} needs a CUDA device; on {device} use fp32.")
    return dtypes[precision]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Any:
    """Load a checkpoint written by vl2v; never unpickles arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"Checkpoint not found: {path}") from None
    except Exception as e:
        raise UserError(f"Cannot read checkpoint {path}: {e}") from None


@contextlib.contextmanager
def download_guard(what: str, how_to_fix: str) -> Iterator[None]:
    """Turn the network errors of hub downloads (timm, open_clip, huggingface_hub) into a UserError."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        text = str(e)
        network = isinstance(e, OSError) or "download" in text.lower() or "hub" in text.lower()
        if not network:
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise UserError(f"Could not download {what} ({first[:160]}). {how_to_fix}") from None
