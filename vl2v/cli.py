"""The `vl2v` command line: one small function per command over the library API."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from vl2v.runtime import UserError

app = typer.Typer(
    help="Distil a CLIP teacher into a small timm student that generalises to unseen domains (VL2V-ADiP).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

DatasetArg = Annotated[Path, typer.Argument(help="Dataset folder laid out as ROOT/<domain>/<class>/<image>.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Treat unreadable images as an error instead of skipping them.")]


def command(fn):
    """Register a command whose UserErrors become one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return app.command()(wrapper)


@app.callback()
def main_options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
        force=True,
    )
    logging.getLogger("root").setLevel(logging.WARNING)


@contextlib.contextmanager
def progress_bar(description: str, unit: str = "img") -> Iterator:
    """A rich progress bar on stderr, driven by the library's (done, total) callback."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            speed = bar.tasks[task].speed
            bar.update(task, completed=done, total=total, rate=f"{speed:,.1f} {unit}/s" if speed else "")

        yield update


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def scan(root: Path, strict: bool = False, check_images: bool = True):
    from vl2v.data import scan_dataset

    with progress_bar(f"scan {root.name}") as update:
        return scan_dataset(root, strict=strict, check_images=check_images, progress=update)


# --- data -----------------------------------------------------------------------------------------


@command
def data(
    root: DatasetArg,
    trial_seed: Annotated[int, typer.Option(help="DomainBed trial seed of the in/out split.")] = 0,
    holdout: Annotated[float, typer.Option(help="Fraction of each domain held out as its 'out' split.")] = 0.2,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a dataset: domains, classes, image counts, in/out splits, skipped files."""
    from vl2v.data import describe_dataset
    from vl2v.tables import dataset_tables

    index = scan(root, strict)
    summary = describe_dataset(index, trial_seed, holdout)
    if as_json:
        print_json(summary)
    else:
        for table in dataset_tables(summary):
            out.print(table)


# --- download -------------------------------------------------------------------------------------


@command
def download(
    name: Annotated[str, typer.Argument(help="PACS, VLCS, OfficeHome, TerraIncognita or DomainNet.")],
    root: Annotated[Path, typer.Option(help="Folder to put the dataset in (ROOT/<name>/...).")] = Path("data"),
) -> None:
    """Download a DomainBed dataset from its public host and lay it out for vl2v."""
    from vl2v.download import download_dataset

    with progress_bar(f"download {name}", unit="B") as update:
        path = download_dataset(name, root, progress=update)
    out.print(str(path))


# --- embed ----------------------------------------------------------------------------------------


def default_cache_dir(index, teacher: str) -> Path:
    from vl2v.cache import default_cache_dir as build
    from vl2v.teacher import parse_teacher_spec

    return build(Path(os.environ.get("VL2V_CACHE", "cache")), index.name, parse_teacher_spec(teacher).slug)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 1/4, not '{text}'.") from None
    return i, n


@command
def embed(
    root: DatasetArg,
    teacher: Annotated[str, typer.Option(help="open_clip MODEL:PRETRAINED, hf-hub:ORG/REPO, or CONFIG.json[:WEIGHTS.pt].")] = "ViT-B-16-quickgelu:openai",
    prompts: Annotated[str, typer.Option(help="Prompt style (photo, name, domains, imagenet80) or a file of templates with '{}'.")] = "photo",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache folder. Default: $VL2V_CACHE or ./cache, then <dataset>/<teacher>.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward pass.")] = 128,
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes.")] = min(4, os.cpu_count() or 1),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or fp16 / bf16 autocast on CUDA.")] = "fp32",
    store_dtype: Annotated[str, typer.Option(help="Storage of image embeddings: fp16 or fp32.")] = "fp16",
    shard: Annotated[str, typer.Option(help="Do part I of N (e.g. 2/4), for several GPUs or machines.")] = "1/1",
    shard_size: Annotated[int, typer.Option(help="Images per HDF5 shard.")] = 8192,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the teacher once over every image and class prompt into the HDF5 cache (resumable)."""
    from vl2v.cache import load_targets
    from vl2v.embed import EmbedConfig, embed_dataset
    from vl2v.evaluate import teacher_zero_shot
    from vl2v.tables import embed_tables

    cfg = EmbedConfig(teacher, prompts, batch_size, workers, device, precision, store_dtype, shard_size, parse_shard(shard))
    index = scan(root, strict)
    cache_dir = cache_dir or default_cache_dir(index, teacher)
    with progress_bar(f"embed {index.name}") as update:
        report = embed_dataset(index, cache_dir, cfg, progress=update)
    zero_shot = teacher_zero_shot(load_targets(cache_dir, index), index) if report.complete else {}
    summary = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(report).items()}, "zero_shot": zero_shot}
    if as_json:
        print_json(summary)
    else:
        for table in embed_tables(summary):
            out.print(table)


def main() -> None:
    app()
