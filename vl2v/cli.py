"""The `vl2v` command line: one small function per command over the library API."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vl2v.config import DEFAULT_TEACHER, INHERITED, TrainConfig
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
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
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


TeacherHelp = "open_clip MODEL:PRETRAINED, MODEL:random, hf-hub:ORG/REPO, CONFIG.json[:WEIGHTS.pt|:random], or http(s)://HOST:PORT of a `vl2v serve-teacher` server."
TokenHelp = "Bearer token of the teacher server. \\[default: $VL2V_TEACHER_TOKEN, else none]"


@command
def embed(
    root: DatasetArg,
    teacher: Annotated[str, typer.Option(help=TeacherHelp)] = DEFAULT_TEACHER,
    prompts: Annotated[str, typer.Option(help="Prompt style (photo, name, domains, imagenet80) or a file of templates with '{}'.")] = "photo",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache folder. Default: $VL2V_CACHE or ./cache, then <dataset>/<teacher>.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward pass (a teacher server: per request).")] = 128,
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes.")] = min(4, os.cpu_count() or 1),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or fp16 / bf16 autocast on CUDA.")] = "fp32",
    store_dtype: Annotated[str, typer.Option(help="Storage of image embeddings: fp16 or fp32.")] = "fp16",
    shard: Annotated[Optional[str], typer.Option(help="Do part I of N (e.g. 2/4), for several GPUs or machines. \\[default: all; under torchrun, one part per process]", show_default=False)] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Images per HDF5 shard. \\[default: 8192; a teacher server: --batch-size, each answer written as it arrives]", show_default=False)] = None,
    max_queries: Annotated[Optional[int], typer.Option(help="The most teacher queries (images + views + prompts) this run may pay for; the plan is checked before paying. \\[default: no limit]", show_default=False)] = None,
    budget: Annotated[str, typer.Option(help="Over --max-queries: refuse, or subset (embed a subset stratified by domain × class that fits).")] = "refuse",
    token: Annotated[Optional[str], typer.Option(help=TokenHelp, show_default=False)] = None,
    in_flight: Annotated[int, typer.Option(help="Requests to a teacher server at once.")] = 4,
    timeout: Annotated[float, typer.Option(help="Seconds per request to a teacher server.")] = 300.0,
    retries: Annotated[int, typer.Option(help="Retries of a failed request (connection errors, timeouts, 5xx, 429), with exponential backoff.")] = 5,
    views: Annotated[int, typer.Option(help="Augmented views per image for the teacher to embed too (each one query; training then uses them). A cache keeps the views it has: raising K embeds only the new ones.")] = 0,
    view_seed: Annotated[Optional[int], typer.Option(help="Seed the views are drawn from. \\[default: the cache's, else 0]", show_default=False)] = None,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the teacher once over every image and class prompt (and K augmented views) into the HDF5 cache (resumable)."""
    from vl2v.cache import load_targets
    from vl2v.embed import EmbedConfig, embed_all_parts, embed_dataset
    from vl2v.evaluate import teacher_zero_shot
    from vl2v.tables import embed_tables

    cfg = EmbedConfig(
        teacher, prompts, batch_size, workers, device, precision, store_dtype, shard_size, parse_shard(shard or "1/1"),
        max_queries, budget, token, in_flight, timeout, retries, views, view_seed,
    )
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


@command(name="serve-teacher")
def serve_teacher(
    teacher: Annotated[str, typer.Argument(help="The open_clip teacher to serve (see `vl2v embed --teacher`).")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    token: Annotated[Optional[list[str]], typer.Option(help="A client's bearer token (repeatable; each has its own ledger account and quota); $VL2V_TEACHER_TOKEN adds one. \\[default: none: an open server]", show_default=False)] = None,
    quota: Annotated[Optional[int], typer.Option(help="Queries (images + prompts) each token may be charged; past it, 429. \\[default: no limit]", show_default=False)] = None,
    ledger: Annotated[Path, typer.Option(help="SQLite file of charged queries and recorded answers (survives restarts).")] = Path("teacher-ledger.sqlite"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or fp16 / bf16 autocast on CUDA.")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Most images or prompts per forward pass, across concurrent requests.")] = 128,
    workers: Annotated[int, typer.Option(help="Image-decoding threads.")] = min(4, os.cpu_count() or 1),
) -> None:
    """Serve a teacher to paying clients: embeddings over HTTP, bearer tokens, quotas, a ledger that never charges twice."""
    try:
        from vl2v.serve import ServeConfig, serve_teacher as serve
    except ImportError as e:
        if e.name not in ("fastapi", "uvicorn"):
            raise
        raise UserError("vl2v serve-teacher needs FastAPI and uvicorn: pip install 'vl2v[serve]'.") from None

    serve(ServeConfig(teacher, host, port, tuple(token or ()), quota, ledger, device, precision, batch_size, workers))


def main() -> None:
    app()


# --- training -------------------------------------------------------------------------------------


def _flag_annotation(f: dataclasses.Field):
    """A typer option for a TrainConfig field; None means "not given" (vl2v.config.resolve_config)."""
    flag = f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = f.metadata.get("shown") or (flag if default is True else f"no-{flag}" if default is False else default)
    help_text = f"{f.metadata['help']} \\[default: {shown}]"
    if isinstance(default, bool):
        return Annotated[Optional[bool], typer.Option(f"--{flag}/--no-{flag}", help=help_text, show_default=False)]
    if f.name == "test_envs":
        return Annotated[Optional[list[str]], typer.Option("--test-env", help=help_text, show_default=False)]
    kind = {dict: list[str], type(None): int}.get(type(default), type(default))
    return Annotated[Optional[kind], typer.Option(f"--{flag}", help=help_text, show_default=False)]


def training_flags(*, methods: tuple[str, ...] = (), exclude: tuple[str, ...] = ()):
    """Give a command a flag for every TrainConfig setting that applies to `methods` (all: every
    method), collected into its `flags` argument under TrainConfig's names, given ones only."""

    def decorate(fn):
        fields = [
            f for f in dataclasses.fields(TrainConfig)
            if f.metadata["flag"] and f.name not in exclude and (not methods or not f.metadata["methods"] or set(methods) & set(f.metadata["methods"]))
        ]
        names = [f.name for f in fields]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            flags = {name: kwargs.pop(name) for name in names}
            if flags.get("test_envs"):
                flags["test_envs"] = tuple(flags["test_envs"])
            if flags.get("model_kwargs"):
                flags["model_kwargs"] = parse_kwargs(flags["model_kwargs"])
            return fn(*args, flags={k: v for k, v in flags.items() if v is not None}, **kwargs)

        sig = inspect.signature(fn, eval_str=True)  # this module's annotations are strings
        own = [p for p in sig.parameters.values() if p.name != "flags"]
        extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_flag_annotation(f)) for f in fields]
        wrapper.__signature__ = sig.replace(parameters=[*own, *extra])
        return wrapper

    return decorate


def parse_kwargs(items: list[str]) -> dict:
    """KEY=VALUE pairs; values parsed as JSON when they are (numbers, true/false, objects), else strings."""
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


def config_for(method: str, dataset_name: str, config_file: Path | None, flags: dict) -> TrainConfig:
    from vl2v.config import resolve_config
    from vl2v.data import domainbed_info

    return resolve_config(domainbed_info(dataset_name), config_file, {**flags, "method": method})


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


def train_and_report(root: Path | None, cfg: TrainConfig, run_dir: Path | None, cache_dir: Path | None, teacher: str,
                     from_run: Path | None, as_json: bool) -> None:
    from vl2v import pipeline
    from vl2v.tables import finals_table

    with progress_bar(cfg.method, unit="step") as update:
        run, finals = pipeline.train(root, cfg, run_dir, cache_dir, teacher, from_run, progress=update)
    print_json(finals) if as_json else out.print(finals_table(finals))
    err.print(f"run directory: {run}")


ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="JSON file of training settings (below flags, above dataset defaults). \\[default: none]", show_default=False)]
RunDir = Annotated[Optional[Path], typer.Option(help="Run directory. \\[default: runs/<dataset>/<student>/trial<T>/<method>]", show_default=False)]
CacheDir = Annotated[Optional[Path], typer.Option(help="Teacher cache folder. \\[default: ./cache/<dataset>/<teacher>]", show_default=False)]
Teacher = Annotated[str, typer.Option(help="Teacher whose cache to train from (see `vl2v embed --teacher`).")]
FromRun = Annotated[Optional[Path], typer.Option("--from", help="The run to continue (Distill: an Align run). \\[default: none]", show_default=False)]


@command
@training_flags(methods=("align",))
def align(root: DatasetArg, config: ConfigFile = None, run_dir: RunDir = None, cache_dir: CacheDir = None,
          teacher: Teacher = DEFAULT_TEACHER, as_json: JsonOpt = False, *, flags: dict) -> None:
    """VL2V-ADiP stage 1: train the projection onto the teacher's embeddings (featurizer frozen), per held-out domain."""
    cfg = config_for("align", root.resolve().name, config, flags)
    train_and_report(root, cfg, run_dir, cache_dir, teacher, None, as_json)


@command
@training_flags(methods=("distill",), exclude=INHERITED)
def distill(from_run: Annotated[Path, typer.Option("--from", help="The Align run directory to start from.")],
            config: ConfigFile = None, run_dir: RunDir = None, as_json: JsonOpt = False, *, flags: dict) -> None:
    """VL2V-ADiP stage 2: train the featurizer (projection frozen) from each held-out domain's Align model."""
    from vl2v import runs

    cfg = config_for("distill", runs.run_info(from_run)["dataset"]["name"], config, flags)
    train_and_report(None, cfg, run_dir, None, DEFAULT_TEACHER, from_run, as_json)


@command
@training_flags()
def train(root: Annotated[Optional[Path], typer.Argument(help="Dataset folder (not needed with --from).", show_default=False)] = None,
          method: Annotated[str, typer.Option(help="align, distill, erm or kd (see the README's Methods).")] = "erm",
          from_run: FromRun = None, config: ConfigFile = None, run_dir: RunDir = None, cache_dir: CacheDir = None,
          teacher: Teacher = DEFAULT_TEACHER, as_json: JsonOpt = False, *, flags: dict) -> None:
    """Train any method (vl2v.methods) on every held-out domain."""
    from vl2v import runs
    from vl2v.methods import get_method

    if get_method(method).starts_from and from_run is None:
        raise UserError(f"--method {method} starts from a run of method '{get_method(method).starts_from}': pass --from RUN_DIR.")
    name = runs.run_info(from_run)["dataset"]["name"] if from_run else (root or Path()).resolve().name
    cfg = config_for(method, name, config, flags)
    train_and_report(root, cfg, run_dir, cache_dir, teacher, from_run, as_json)


@command
@training_flags(exclude=("trial_seed",))
def run(root: DatasetArg,
        methods: Annotated[str, typer.Option(help="Comma-separated methods to compare: adip (Align then Distill), align, distill, erm, kd.")] = "adip",
        trials: Annotated[int, typer.Option(help="Trial seeds 0..N-1, for mean ± std.")] = 1,
        run_dir: Annotated[Optional[Path], typer.Option(help="Experiment folder holding trial<T>/<method> runs. \\[default: runs/<dataset>/<student>]", show_default=False)] = None,
        config: ConfigFile = None, cache_dir: CacheDir = None,
        teacher: Annotated[str, typer.Option(help="open_clip teacher (see `vl2v embed --teacher`).")] = DEFAULT_TEACHER,
        prompts: Annotated[str, typer.Option(help="Prompt style or template file (see `vl2v embed`).")] = "photo",
        as_json: JsonOpt = False,
        markdown: Annotated[bool, typer.Option("--markdown", help="Print the results table as Markdown.")] = False,
        *, flags: dict) -> None:
    """Compare methods: embed (if needed), train each on the same splits, seeds and batches, one table."""
    from vl2v import pipeline

    cfg = config_for("align", root.resolve().name, config, flags)
    with progress_bar("run", unit="step") as update:
        rows = pipeline.run_all(root, cfg, [m.strip() for m in methods.split(",") if m.strip()], trials, run_dir, cache_dir, teacher, prompts, progress=update)
    print_rows(rows, as_json, markdown)


@command
def results(
    runs_root: Annotated[Path, typer.Argument(help="Folder holding run directories (searched recursively).")] = Path("runs"),
    selection: Annotated[str, typer.Option(help="Model selection from the checkpoint records: training-domain, oracle (the held-out domain's out split) or last. SWAD is its own row.")] = "training-domain",
    metric: Annotated[str, typer.Option(help="test_in_acc (DomainBed: the held-out domain's 'in' split) or test_acc (whole domain).")] = "test_in_acc",
    as_json: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print Markdown tables.")] = False,
) -> None:
    """DomainBed-style tables: rows (student, method, selection), columns the held-out domains and their average."""
    from vl2v.results import collect

    if metric not in ("test_in_acc", "test_acc"):
        raise UserError(f"--metric must be test_in_acc or test_acc, not '{metric}'.")
    rows = collect(runs_root, metric, selection)
    if not rows:
        raise UserError(f"No finished runs under {runs_root}. Train with `vl2v run`, `vl2v train` or `vl2v align`.")
    print_rows(rows, as_json, markdown)


@command(name="eval")
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory or an exported bundle; with --teacher also a dataset folder.")],
    data: Annotated[Optional[Path], typer.Option(help="Evaluate on this folder (same classes) instead of the run's or the bundle's dataset.")] = None,
    teacher: Annotated[bool, typer.Option("--teacher", help="The teacher's zero-shot accuracy from the cache instead.")] = False,
    cache_dir: CacheDir = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes (threads for a bundle).")] = min(4, os.cpu_count() or 1),
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a run's best and SWAD models, or an exported bundle, on any domain; or the teacher's zero-shot accuracy."""
    from vl2v.bundle import is_bundle
    from vl2v.tables import eval_table, zero_shot_table

    if teacher:
        from vl2v import pipeline

        if is_bundle(target):
            raise UserError(f"{target} is a bundle: --teacher reads a teacher cache, of a run directory or a dataset folder.")
        accs = pipeline.teacher_accuracy(target, cache_dir)
        print_json(accs) if as_json else out.print(zero_shot_table(accs))
        return
    from vl2v.evaluate import evaluate_target

    with progress_bar("eval") as update:
        rows = evaluate_target(target, data, device=device, workers=workers, progress=update)
    print_json(rows) if as_json else out.print(eval_table(rows))


# --- deploy ---------------------------------------------------------------------------------------


@command
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with a finished model.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="The bundle folder to write (replaced whole if it holds a bundle).")],
    fmt: Annotated[str, typer.Option("--format", help="onnx (onnxruntime) or torchscript (torch.jit).")],
    env: Annotated[Optional[str], typer.Option(help="Held-out domain of the model; none: the deployment model (--test-env none). \\[default: none when the run has it]", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="best or swad. \\[default: swad when the run made it, else best]", show_default=False)] = None,
    quantize: Annotated[Optional[str], typer.Option(help="int8: onnxruntime's dynamic quantisation of an ONNX model (check it with `vl2v eval BUNDLE`). \\[default: none]", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a run's model as a self-contained bundle: model file (logits and embedding), classes, preprocessing, provenance."""
    from vl2v.export import export_bundle

    with err.status(f"exporting {run_dir} to {fmt}"):
        bundle = export_bundle(run_dir, out_dir, fmt, env, model, quantize)
    if as_json:
        print_json(bundle)
        return
    p, check = bundle["provenance"], bundle["check"]
    size = (out_dir / bundle["model_file"]).stat().st_size / 2**20
    err.print(f"{p['student']} {p['method']} {p['model']} (trained without: {p['held_out']}) → {bundle['format']}"
              f"{' ' + bundle['quantize'] if bundle['quantize'] else ''}, {size:.1f} MB; |exported − eager| logits ≤ {check['max_abs_diff_logits']:.1e}",
              highlight=False, soft_wrap=True)
    out.print(str(out_dir), highlight=False, soft_wrap=True)


@command
def predict(
    bundle_dir: Annotated[Path, typer.Argument(metavar="BUNDLE", help="A bundle folder made by `vl2v export`.", show_default=False)],
    paths: Annotated[list[Path], typer.Argument(metavar="PATH...", help="Images, or folders searched recursively for images.", show_default=False)],
    top_k: Annotated[int, typer.Option(help="Classes shown per image, most probable first.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="Image-decoding threads.")] = min(4, os.cpu_count() or 1),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout (path, rank, class, probability).")] = False,
) -> None:
    """Classify images with an exported bundle (onnxruntime or torch.jit; no training code); unreadable images are reported and skipped."""
    from vl2v.bundle import load_bundle, predict as run_predict
    from vl2v.tables import predictions_csv, predictions_table

    if as_json and as_csv:
        raise UserError("--json and --csv both print on stdout: pass one of them.")
    bundle = load_bundle(bundle_dir, device)
    with progress_bar(f"predict {bundle_dir.name}") as update:
        result = run_predict(bundle, paths, top_k, batch_size, workers, progress=update)
    for s in result["skipped"]:
        err.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}", highlight=False, soft_wrap=True)
    if as_json:
        print_json(result)
    elif as_csv:
        print(predictions_csv(result["predictions"]), end="")
    else:
        out.print(predictions_table(result["predictions"]))


# --- demo -----------------------------------------------------------------------------------------


@command
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo's data, teacher and runs go.")] = Path("demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A tiny run (few images and steps) to check the wiring.")] = False,
    trials: Annotated[int, typer.Option(help="Trial seeds 0..N-1 (DomainBed's trials: each another in/out split); the report shows the mean over the trials in WORKDIR.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """The built-in default: offline Digits-DG, a small CLIP teacher of our own, Align, Distill, SWAD, report."""
    from vl2v.demo.report import plain_summary
    from vl2v.demo.run import QUICK, DemoConfig, run_demo
    from vl2v.tables import zero_shot_table

    if trials < 1:
        raise UserError(f"--trials must be ≥ 1, not {trials}.")
    cfg = DemoConfig(workdir=workdir, trials=trials, **(QUICK if quick else {}))
    with progress_bar("demo") as update:
        summary = run_demo(cfg, progress=update)
    if summary is None:  # under torchrun, rank 0 reports
        return
    if as_json:
        print_json(summary)
        return
    out.print(zero_shot_table(summary["teacher_zero_shot"]))
    print_rows(summary["results"], as_json=False, markdown=False)
    for line in plain_summary(summary):
        out.print(f"• {line}", highlight=False)
    out.print(f"Figure: {summary['figure']}\nReport: {summary['report']}")
