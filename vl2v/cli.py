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

from vl2v.config import TrainConfig
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


def command(fn=None, *, name: str | None = None):
    """Register a command whose UserErrors become one red line and exit code 2."""
    if fn is None:
        return functools.partial(command, name=name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return app.command(name)(wrapper)


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
    threads: Annotated[int, typer.Option(envvar="VL2V_THREADS", min=1, help="Torch compute threads on the CPU. A fixed count, not the machine's: CPU results then do not depend on how many cores there are.")] = 1,
) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(
        level=logging.WARNING,  # third-party chatter (open_clip, timm) only when it matters
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
        force=True,
    )
    logging.getLogger("vl2v").setLevel(logging.DEBUG if verbose else logging.INFO)


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
    bar = Progress(*columns, console=err)
    task = bar.add_task(description, total=None, rate="")

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:  # shown once work starts, so an early error prints alone
            bar.start()
        speed = bar.tasks[task].speed
        bar.update(task, completed=done, total=total, rate=f"{speed:,.1f} {unit}/s" if speed else "")

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


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
    shard: Annotated[Optional[str], typer.Option(help="Do part I of N (e.g. 2/4), for several GPUs or machines. \\[default: all; under torchrun, one part per process]", show_default=False)] = None,
    shard_size: Annotated[int, typer.Option(help="Images per HDF5 shard.")] = 8192,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the teacher once over every image and class prompt into the HDF5 cache (resumable)."""
    from vl2v.cache import load_targets
    from vl2v.embed import EmbedConfig, embed_all_parts, embed_dataset
    from vl2v.evaluate import teacher_zero_shot
    from vl2v.tables import embed_tables

    cfg = EmbedConfig(teacher, prompts, batch_size, workers, device, precision, store_dtype, shard_size, parse_shard(shard or "1/1"))
    index = scan(root, strict)
    cache_dir = cache_dir or default_cache_dir(index, teacher)
    with progress_bar(f"embed {index.name}") as update:
        report = (embed_dataset if shard else embed_all_parts)(index, cache_dir, cfg, progress=update)
    zero_shot = teacher_zero_shot(load_targets(cache_dir, index), index) if report.complete else {}
    summary = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(report).items()}, "zero_shot": zero_shot}
    if as_json:
        print_json(summary)
    else:
        for table in embed_tables(summary):
            out.print(table)


def main() -> None:
    app()


# --- training -------------------------------------------------------------------------------------
D = TrainConfig()


def _opt(help_text: str, *names: str):
    return typer.Option(*names, help=help_text, show_default=False)


# Every training flag defaults to None, meaning "not given": the config file and the dataset's
# overrides then decide (vl2v.config.resolve_config). Help texts state the effective default.
Student = Annotated[Optional[str], _opt(f"timm model name or alias (rn50, vitb, vits, deits). \\[default: {D.student}]")]
Pretrained = Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Start from timm's pretrained weights. \\[default: pretrained]", show_default=False)]
ImageSize = Annotated[Optional[int], _opt("Student input size. \\[default: the student's pretrained size]")]
ModelKwargs = Annotated[Optional[list[str]], _opt("Extra timm create_model argument KEY=VALUE (repeatable), e.g. zero_init_last=False. \\[default: none]")]
Lr = Annotated[Optional[float], _opt(f"Adam learning rate. \\[default: {D.lr}]")]
WeightDecay = Annotated[Optional[float], _opt(f"Adam weight decay. \\[default: {D.weight_decay}]")]
BatchSize = Annotated[Optional[int], _opt(f"Images per training domain per step. \\[default: {D.batch_size}]")]
Steps = Annotated[Optional[int], _opt(f"Training steps. \\[default: {D.steps}; DomainNet 15001]")]
CheckpointFreq = Annotated[Optional[int], _opt(f"Validate and checkpoint every N steps. \\[default: {D.checkpoint_freq}; DomainNet 1000]")]
FreezeBn = Annotated[Optional[bool], typer.Option("--freeze-bn/--no-freeze-bn", help="Keep BatchNorm layers in eval mode. \\[default: freeze-bn]", show_default=False)]
Lmd = Annotated[Optional[float], _opt(f"Weight of the image-embedding term of the loss. \\[default: {D.lmd}]")]
Holdout = Annotated[Optional[float], _opt(f"Fraction of each domain held out for validation. \\[default: {D.holdout}]")]
TrialSeed = Annotated[Optional[int], _opt(f"DomainBed trial seed (the in/out split). \\[default: {D.trial_seed}]")]
Seed = Annotated[Optional[int], _opt(f"Seed of batches and augmentation. \\[default: {D.seed}]")]
TestEnv = Annotated[Optional[list[str]], _opt("Held-out domain (repeatable). \\[default: every domain in turn]", "--test-env")]
Swad = Annotated[Optional[bool], typer.Option("--swad/--no-swad", help="Average weights over SWAD's loss valley. \\[default: swad]", show_default=False)]
Workers = Annotated[Optional[int], _opt(f"Image-decoding worker processes. \\[default: {D.workers}]")]
Device = Annotated[Optional[str], _opt("auto, cpu, cuda or cuda:N. \\[default: auto]")]
Precision = Annotated[Optional[str], _opt("fp32, or fp16 / bf16 autocast on CUDA. \\[default: fp32]")]
EvalBatch = Annotated[Optional[int], _opt(f"Images per evaluation batch. \\[default: {D.eval_batch_size}]")]
ConfigFile = Annotated[Optional[Path], _opt("JSON file of training settings (below flags, above dataset defaults). \\[default: none]", "--config")]
RunDir = Annotated[Optional[Path], _opt("Run directory. \\[default: runs/<dataset>/<student>/trial<T>/<stage>]")]
CacheDir = Annotated[Optional[Path], _opt("Teacher cache folder. \\[default: ./cache/<dataset>/<teacher>]")]
Teacher = Annotated[str, typer.Option(help="Teacher whose cache to train from (see `vl2v embed --teacher`).")]

TRAIN_FLAGS = (
    "student pretrained image_size model_kwargs lr weight_decay batch_size steps checkpoint_freq freeze_bn "
    "lmd holdout trial_seed seed test_env swad workers device precision eval_batch_size"
).split()


def train_flags(values: dict) -> dict:
    """The training flags given on the command line, under TrainConfig's names."""
    flags = {k: values[k] for k in TRAIN_FLAGS}
    flags["test_envs"] = tuple(flags.pop("test_env")) if flags["test_env"] else None
    flags["model_kwargs"] = parse_kwargs(flags["model_kwargs"]) if flags["model_kwargs"] else None
    return flags


def parse_kwargs(items: list[str]) -> dict:
    """KEY=VALUE pairs; values parsed as JSON when they are (numbers, true/false), else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--model-kwargs takes KEY=VALUE, not '{item}'.")
        lowered = {"true": "true", "false": "false"}.get(value.lower(), value)
        try:
            out[key] = json.loads(lowered)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train_progress(description: str):
    return progress_bar(description, unit="step")


def print_rows(rows: list[dict], as_json: bool, markdown: bool) -> None:
    """Result rows of vl2v.results as JSON, Markdown or rich tables."""
    from vl2v import results

    if as_json:
        print_json(rows)
    elif markdown:
        print(results.markdown(rows))
    else:
        for table in results.rich_tables(rows):
            out.print(table)


def print_results(finals: dict, as_json: bool) -> None:
    from vl2v.tables import finals_table

    if as_json:
        print_json(finals)
    else:
        out.print(finals_table(finals))


@command
def align(
    root: DatasetArg,
    student: Student = None, pretrained: Pretrained = None, image_size: ImageSize = None, model_kwargs: ModelKwargs = None,
    lr: Lr = None, weight_decay: WeightDecay = None, batch_size: BatchSize = None, steps: Steps = None,
    checkpoint_freq: CheckpointFreq = None, freeze_bn: FreezeBn = None, lmd: Lmd = None, holdout: Holdout = None,
    trial_seed: TrialSeed = None, seed: Seed = None, test_env: TestEnv = None, swad: Swad = None, workers: Workers = None,
    device: Device = None, precision: Precision = None, eval_batch_size: EvalBatch = None,
    config: ConfigFile = None, run_dir: RunDir = None, cache_dir: CacheDir = None,
    teacher: Teacher = "ViT-B-16-quickgelu:openai", as_json: JsonOpt = False,
) -> None:
    """Stage 1: train the projection onto the teacher's embeddings (featurizer frozen), per held-out domain."""
    from vl2v import pipeline

    with train_progress("align") as update:
        run, finals = pipeline.align(root, train_flags(locals()), config, run_dir, cache_dir, teacher, progress=update)
    print_results(finals, as_json)
    err.print(f"run directory: {run}")


@command
def distill(
    from_run: Annotated[Path, typer.Option("--from", help="The Align run directory to start from.")],
    lr: Lr = None, weight_decay: WeightDecay = None, batch_size: BatchSize = None, steps: Steps = None,
    checkpoint_freq: CheckpointFreq = None, freeze_bn: FreezeBn = None, lmd: Lmd = None, seed: Seed = None,
    test_env: TestEnv = None, swad: Swad = None, workers: Workers = None, device: Device = None,
    precision: Precision = None, eval_batch_size: EvalBatch = None,
    config: ConfigFile = None, run_dir: RunDir = None, as_json: JsonOpt = False,
) -> None:
    """Stage 2: train the featurizer (projection frozen) from each held-out domain's Align model."""
    from vl2v import pipeline

    flags = {k: v for k, v in locals().items() if k in TRAIN_FLAGS}
    flags.update(student=None, pretrained=None, image_size=None, model_kwargs=None, holdout=None, trial_seed=None)
    with train_progress("distill") as update:
        run, finals = pipeline.distill(from_run, train_flags(flags), config, run_dir, progress=update)
    print_results(finals, as_json)
    err.print(f"run directory: {run}")


@command
def run(
    root: DatasetArg,
    student: Student = None, pretrained: Pretrained = None, image_size: ImageSize = None, model_kwargs: ModelKwargs = None,
    lr: Lr = None, weight_decay: WeightDecay = None, batch_size: BatchSize = None, steps: Steps = None,
    checkpoint_freq: CheckpointFreq = None, freeze_bn: FreezeBn = None, lmd: Lmd = None, holdout: Holdout = None,
    seed: Seed = None, test_env: TestEnv = None, swad: Swad = None, workers: Workers = None,
    device: Device = None, precision: Precision = None, eval_batch_size: EvalBatch = None,
    config: ConfigFile = None, cache_dir: CacheDir = None,
    teacher: Annotated[str, typer.Option(help="open_clip teacher (see `vl2v embed --teacher`).")] = "ViT-B-16-quickgelu:openai",
    prompts: Annotated[str, typer.Option(help="Prompt style or template file (see `vl2v embed`).")] = "photo",
    trials: Annotated[int, typer.Option(help="Trial seeds 0..N-1, for mean ± std.")] = 1,
    runs_root: Annotated[Path, typer.Option(help="Where run directories go.")] = Path("runs"),
    as_json: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the results table as Markdown.")] = False,
) -> None:
    """The whole pipeline: embed (if needed), Align then Distill for every held-out domain, results."""
    from vl2v import pipeline

    flags = train_flags({**locals(), "trial_seed": None})
    with progress_bar("pipeline", unit="step") as update:
        rows = pipeline.run_all(root, flags, config, cache_dir, teacher, prompts, trials, runs_root, progress=update)
    print_rows(rows, as_json, markdown)


@command
def results(
    runs_root: Annotated[Path, typer.Argument(help="Folder holding run directories (searched recursively).")] = Path("runs"),
    metric: Annotated[str, typer.Option(help="test_in_acc (DomainBed: the held-out domain's 'in' split) or test_acc (whole domain).")] = "test_in_acc",
    as_json: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print Markdown tables.")] = False,
) -> None:
    """DomainBed-style tables: rows (student, stage, selection), columns the held-out domains and their average."""
    from vl2v.results import collect

    if metric not in ("test_in_acc", "test_acc"):
        raise UserError(f"--metric must be test_in_acc or test_acc, not '{metric}'.")
    rows = collect(runs_root, metric)
    if not rows:
        raise UserError(f"No finished runs under {runs_root}. Train with `vl2v run` or `vl2v align`.")
    print_rows(rows, as_json, markdown)


@command(name="eval")
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory; with --teacher also a dataset folder.")],
    data: Annotated[Optional[Path], typer.Option(help="Evaluate on this folder (same classes) instead of the run's dataset.")] = None,
    teacher: Annotated[bool, typer.Option("--teacher", help="The teacher's zero-shot accuracy from the cache instead.")] = False,
    cache_dir: CacheDir = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes.")] = min(4, os.cpu_count() or 1),
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a run's best and SWAD models on any domain, or the teacher's zero-shot accuracy."""
    from vl2v import pipeline
    from vl2v.tables import eval_table, zero_shot_table

    if teacher:
        accs = pipeline.teacher_accuracy(target, cache_dir)
        print_json(accs) if as_json else out.print(zero_shot_table(accs))
        return
    from vl2v.evaluate import evaluate_run

    with progress_bar("scan") as update:
        rows = evaluate_run(target, data, device=device, workers=workers, progress=update)
    print_json(rows) if as_json else out.print(eval_table(rows))


# --- demo -----------------------------------------------------------------------------------------


@command
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo's data, teacher and runs go.")] = Path("demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A tiny run (few images and steps) to check the wiring.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The built-in default: offline Digits-DG, a small CLIP teacher of our own, Align, Distill, SWAD, report."""
    from vl2v.demo.report import plain_summary
    from vl2v.demo.run import QUICK, DemoConfig, run_demo
    from vl2v.tables import zero_shot_table

    cfg = DemoConfig(workdir=workdir, **(QUICK if quick else {}))
    with progress_bar("demo") as update:
        summary = run_demo(cfg, progress=update)
    if as_json:
        print_json(summary)
        return
    out.print(zero_shot_table(summary["teacher_zero_shot"]))
    print_rows(summary["results"], as_json=False, markdown=False)
    for line in plain_summary(summary):
        out.print(f"• {line}", highlight=False)
    out.print(f"Figure: {summary['figure']}\nReport: {summary['report']}")
