"""One training loop for every method (vl2v.methods), over every held-out domain."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_swa_avg_fn, update_bn

from vl2v import runs, selection
from vl2v.batches import EvalImages, StepBatches, StudentViews, step_loader
from vl2v.cache import Targets, load_dataset_targets
from vl2v.config import TrainConfig
from vl2v.data import DatasetIndex, all_splits, build_eval_transform, build_train_transform, scan_dataset, seed_hash
from vl2v.evaluate import predict_logits
from vl2v.features import EvalFeatures, FastFeatures, feature_dir, prepare_fast_features, train_mode_effect
from vl2v.methods import Method, StepTargets, get_method
from vl2v.runtime import Progress, UserError, all_mean, atomic_torch_save, autocast_dtype, barrier, launch, load_checkpoint, process_group, resolve_device, seed_everything
from vl2v.student import DataConfig, Student, build_student, check_student
from vl2v.swad import LossValley
from vl2v.viewcache import ViewTargets

log = logging.getLogger(__name__)

BN_UPDATE_STEPS = 32  # training batches that re-estimate BatchNorm statistics of the SWAD model


@dataclass
class Context:
    """What every held-out domain of a run shares."""

    cfg: TrainConfig
    method: Method
    run_dir: Path
    index: DatasetIndex
    targets: Targets | None  # None: a method that needs no teacher cache, run without one
    splits: dict[str, np.ndarray]
    labels: torch.Tensor  # [N] class of every dataset row
    device: torch.device
    amp: torch.dtype | None
    from_run: Path | None  # the run a continuing method (Distill) starts from
    teacher: str | None  # the teacher spec, for a white-box student built from it
    ddp: bool = False  # every process trains a slice of each step's batch (DistributedDataParallel)
    data_cfg: DataConfig | None = None
    eval_images: EvalImages | None = None
    eval_features: EvalFeatures | None = None  # fast Align: the held-out domain's cached evaluation features

    @property
    def views(self) -> ViewTargets | None:
        """The cache's views when training uses them (`--views auto` and a cache with views), else None."""
        return self.targets.views if self.targets is not None else None


def held_out_envs(cfg: TrainConfig, index: DatasetIndex) -> list[int | None]:
    """The held-out domains of a run; [None] for a deployment run (`--test-env none`)."""
    if cfg.deploy:
        return [None]
    return [index.domain_index(d) for d in cfg.test_envs] or list(range(len(index.domains)))


def train_run(dataset_root: Path, cache_dir: Path | None, cfg: TrainConfig, run_dir: Path, from_run: Path | None = None,
              teacher: str | None = None, progress: Progress | None = None) -> dict:
    """Train `cfg.method` for each held-out domain into `run_dir`; resumes what a killed run left.
    Returns the run's final records per held-out domain."""
    method = get_method(cfg.method)
    if cache_dir is not None:
        index, targets = load_dataset_targets(dataset_root, cache_dir, views=cfg.views == "auto")
        teacher = targets.manifest["provenance"]["teacher"]
    else:
        index, targets = scan_dataset(dataset_root), None  # decodes every image once: no cache to say which fail
    envs = held_out_envs(cfg, index)
    # Check what can fail before the run directory is made, so the corrected command is not refused.
    check_student(cfg, teacher)
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    views = targets.views if targets else None
    if views is not None:
        log.info("training on the cache's %d views per image (--views auto): each sampled image is one of its views, its target the teacher's embedding of that view", views.count)
    runs.prepare(run_dir, cfg, index, cache_dir, targets.manifest if targets else None, from_run,
                 views={"count": views.count, "seed": views.seed} if views else None)
    labels = torch.tensor([f.label for f in index.files])
    splits = all_splits(index, cfg.trial_seed, cfg.holdout)
    me = launch()
    ddp = parallel_mode(cfg, me, len(envs)) == "ddp"
    ctx = Context(cfg, method, run_dir, index, targets, splits, labels, device, amp, from_run, teacher, ddp)
    # Under torchrun, DDP trains each held-out domain on every process; otherwise the processes
    # share the held-out domains out.
    for env in envs if ddp else envs[me.rank :: me.world_size]:
        env_dir = runs.env_dir(run_dir, env)
        if runs.read_final(env_dir) is None:
            with runs.training_lock(env_dir) if not ddp or me.rank == 0 else contextlib.nullcontext():
                train_env(ctx, env, progress)
    barrier()
    return {runs.env_name(index.domains, env): runs.read_final(runs.env_dir(run_dir, env)) for env in envs}


def parallel_mode(cfg: TrainConfig, me, n_envs: int) -> str:
    """`--parallel auto`: share held-out domains (no communication, results as one process's) while
    there are at least as many as processes; DDP when processes would otherwise sit idle."""
    if not me.distributed:
        return "single"
    if cfg.parallel != "auto":
        return cfg.parallel
    return "domains" if n_envs >= me.world_size else "ddp"


def env_key(ctx: Context, env: int | None) -> int:
    """The held-out domain in seeds; a deployment run takes the number no domain has."""
    return len(ctx.index.domains) if env is None else env


def build_model(ctx: Context, env: int | None) -> Student:
    """The student of a held-out domain with what its method trains; a continuing method loads the
    start checkpoint of the run it continues."""
    cfg, method = ctx.cfg, ctx.method
    seed_everything(seed_hash(cfg.seed, env_key(ctx, env)))  # initial weights: a function of (seed, held-out domain)
    text = ctx.targets.text if ctx.targets else None
    scale = ctx.targets.logit_scale if ctx.targets else 1.0
    model, ctx.data_cfg = build_student(cfg, method.head, len(ctx.index.classes), text, scale, ctx.teacher,
                                        pretrained=cfg.pretrained and method.starts_from is None)
    if method.starts_from:
        model.load_state_dict(load_checkpoint(runs.env_dir(ctx.from_run, env) / "best.pt"))
    model.featurizer.requires_grad_(method.trains_featurizer)
    model.head.requires_grad_("head" in method.trains)
    return model.to(ctx.device)


def set_train_mode(model: Student, freeze_bn: bool) -> None:
    """Training mode, with BatchNorm layers kept in eval mode (their affine weights still train)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def evaluate(ctx: Context, model: Student, env: int | None) -> dict:
    """DomainBed-style figures: env{i}_{in,out}_acc for every domain, the held-out domain's
    whole-domain accuracy, and the training domains' out-split accuracy and loss (`tr_outloss`)."""
    if ctx.eval_features is not None:  # fast Align: the frozen featurizer's outputs, computed once
        logits, rows = predict_logits(model.head, ctx.eval_features, ctx.device, ctx.amp), ctx.eval_features.rows
    else:
        logits, rows = predict_logits(model, ctx.eval_images, ctx.device, ctx.amp), ctx.eval_images.rows
    position = {int(r): i for i, r in enumerate(rows)}
    record, train_out = {}, []
    for name in evaluated_splits(ctx, env):
        rows = ctx.splits[name]
        pos = torch.tensor([position[int(r)] for r in rows], dtype=torch.long)
        y = ctx.labels[rows]
        record[f"{name}_acc"] = float((logits[pos].argmax(1) == y).float().mean()) if len(rows) else float("nan")
        if name.endswith("_out") and name != f"env{env}_out" and len(rows):
            train_out.append((float(F.cross_entropy(logits[pos], y, reduction="sum")), record[f"{name}_acc"], len(rows)))
    if env is not None:
        whole = np.concatenate([ctx.splits[f"env{env}_in"], ctx.splits[f"env{env}_out"]])
        pos = torch.tensor([position[int(r)] for r in whole], dtype=torch.long)
        record["test_acc"] = float((logits[pos].argmax(1) == ctx.labels[whole]).float().mean())
    record["tr_outacc"] = float(np.mean([acc for _, acc, _ in train_out]))
    record["tr_outloss"] = float(np.mean([loss / n for loss, _, n in train_out]))
    return record


def prepare_data(ctx: Context, env: int | None, start: int, stop: int | None = None) -> torch.utils.data.DataLoader:
    """The training batches of steps start..stop-1 (default: to the end)."""
    return step_loader(step_batches(ctx, env, start, stop), ctx.cfg.workers, ctx.device.type == "cuda")


def eval_images(ctx: Context, env: int | None) -> EvalImages:
    """The images validation of held-out domain `env` predicts, streamed from disk."""
    cfg, index, data_cfg = ctx.cfg, ctx.index, ctx.data_cfg
    size = (3, data_cfg.image_size, data_cfg.image_size)
    transform = build_eval_transform(data_cfg.image_size, data_cfg.mean, data_cfg.std)
    return EvalImages(index.root, [f.path for f in index.files], eval_rows(ctx, [env]), transform, size, cfg.eval_batch_size, cfg.workers)


def evaluated_splits(ctx: Context, env: int | None) -> list[str]:
    """The splits validation of held-out domain `env` reports (`--eval-splits`)."""
    if ctx.cfg.eval_splits == "all":
        return list(ctx.splits)
    return [name for name in ctx.splits if name.endswith("_out") or name == f"env{env}_in"]


def eval_rows(ctx: Context, envs: list[int | None]) -> np.ndarray:
    """The rows validation of these held-out domains predicts, sorted."""
    return np.unique(np.concatenate([ctx.splits[name] for env in envs for name in evaluated_splits(ctx, env)]))


def training_rows(ctx: Context, env: int | None) -> list[np.ndarray]:
    """Every training domain's "in" rows (with teacher targets, when a cache is used)."""
    in_splits = [ctx.splits[f"env{d}_in"] for d in range(len(ctx.index.domains)) if d != env]
    if ctx.targets is not None:  # a --budget subset cache: batches draw only images with targets
        valid = ctx.targets.valid.numpy()
        in_splits = [rows[valid[rows]] for rows in in_splits]
    if any(len(r) == 0 for r in in_splits):
        raise UserError("A training domain has no images (with teacher targets, for a method that needs them) in its 'in' split; lower --holdout, add images, or embed more of them.")
    return in_splits


def step_batches(ctx: Context, env: int | None, start: int, stop: int | None = None) -> StepBatches:
    """The batches of steps start..stop-1: this process's slice under DDP; the cache's views as the
    student sees them when training uses views."""
    cfg, data_cfg = ctx.cfg, ctx.data_cfg
    in_splits = training_rows(ctx, env)
    transform = build_train_transform(data_cfg.image_size, data_cfg.mean, data_cfg.std)
    me = launch()
    part = (me.rank, me.world_size) if ctx.ddp else (0, 1)
    if (cfg.batch_size * len(in_splits)) % part[1]:
        raise UserError(f"--parallel ddp splits each step's {cfg.batch_size * len(in_splits)} images over {part[1]} processes: choose a --batch-size that makes it divisible.")
    views = StudentViews(ctx.views.count, ctx.views.params, data_cfg.image_size, data_cfg.mean, data_cfg.std) if ctx.views else None
    paths = [f.path for f in ctx.index.files]
    return StepBatches(ctx.index.root, paths, in_splits, cfg.batch_size, transform, (cfg.seed, env_key(ctx, env)), start, stop or cfg.steps, part, views)


def fast_align(ctx: Context, model: Student) -> FastFeatures | None:
    """The cached features fast Align trains on, when it applies: a method that trains only the head,
    on cached views, with a featurizer whose output does not depend on training mode; otherwise
    None (why is logged) and the featurizer runs at every step."""
    cfg = ctx.cfg
    if ctx.method.trains_featurizer or cfg.fast_align == "off":
        return None
    if ctx.views is None:
        why = "it needs cached views (`vl2v embed --views K`, training with --views auto): without them each step draws a fresh random augmentation, which a feature cache cannot hold"
    else:
        why = "it does not run under --parallel ddp" if ctx.ddp else train_mode_effect(model.featurizer, cfg.freeze_bn)
    if why:
        log.info("fast Align does not apply: %s; the featurizer runs at every step.", why)
        return None
    folder = feature_dir(ctx.run_dir, cfg.student, model.featurizer, ctx.data_cfg, ctx.amp, ctx.views)
    rows = np.unique(np.concatenate([r for env in held_out_envs(cfg, ctx.index) for r in training_rows(ctx, env)]))
    return prepare_fast_features(folder, model.featurizer, ctx.data_cfg, ctx.views, ctx.index.root, [f.path for f in ctx.index.files], rows,
                                 eval_rows(ctx, held_out_envs(cfg, ctx.index)), cfg.eval_batch_size, cfg.workers, ctx.device, ctx.amp)


class MethodStep(torch.nn.Module):
    """A training step's forward: the student's features (without a graph when the method freezes the
    featurizer) and the method's loss. One module, so DistributedDataParallel can wrap it."""

    def __init__(self, student: Student, method: Method, cfg: TrainConfig, from_features: bool = False):
        super().__init__()
        self.student, self.method, self.cfg = student, method, cfg
        self.from_features = from_features  # fast Align: the inputs are the featurizer's cached outputs

    def forward(self, inputs: torch.Tensor, targets: StepTargets) -> torch.Tensor:
        if self.from_features:
            return self.method.loss(self.student.head, inputs, targets, self.cfg)
        with torch.set_grad_enabled(self.method.trains_featurizer):
            features = self.student.featurizer(inputs)
        return self.method.loss(self.student.head, features, targets, self.cfg)


@dataclass
class Trainer:
    """The optimisation state of one held-out domain: what checkpoints save and resume restores."""

    model: Student
    step_module: torch.nn.Module  # MethodStep, or DDP around it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only: bf16 and fp32 need no loss scaling
    valley: LossValley | None


def make_trainer(ctx: Context, env: int | None, model: Student | None = None, from_features: bool = False) -> Trainer:
    """`model` (default: a new one for held-out domain `env`), its optimiser, loss scaler and SWAD
    valley; `from_features`: its steps take the featurizer's cached outputs (fast Align)."""
    cfg = ctx.cfg
    model = model or build_model(ctx, env)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp == torch.float16)
    valley = LossValley(cfg.n_converge, cfg.n_tolerance, cfg.tolerance_ratio) if cfg.swad else None
    step_module = MethodStep(model, ctx.method, cfg, from_features)
    if ctx.ddp:
        from torch.nn.parallel import DistributedDataParallel

        process_group(ctx.device)
        step_module = DistributedDataParallel(step_module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return Trainer(model, step_module, optimizer, scaler, valley)


def train_step(ctx: Context, t: Trainer, step: int, images: torch.Tensor, targets: StepTargets) -> float:
    """One optimisation step; returns the loss of the whole (global) batch."""
    set_train_mode(t.model, ctx.cfg.freeze_bn)
    for group in t.optimizer.param_groups:  # a function of the step alone, so resuming needs no state
        group["lr"] = ctx.cfg.lr * min(1.0, (step + 1) / (ctx.cfg.warmup_steps + 1))
    with torch.autocast(ctx.device.type, dtype=ctx.amp, enabled=ctx.amp is not None):
        loss = t.step_module(images, targets)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    return all_mean(loss.detach()) if ctx.ddp else float(loss.detach())


def train_env(ctx: Context, env: int | None, progress: Progress | None = None) -> dict:
    """Train one held-out domain to the end (or the end of SWAD's loss valley); resumable. Under
    DDP every rank trains its slice of each step's batch and only rank 0 writes."""
    cfg, method, env_dir = ctx.cfg, ctx.method, runs.env_dir(ctx.run_dir, env)
    writer = not ctx.ddp or launch().rank == 0
    model = build_model(ctx, env)
    fast = fast_align(ctx, model)
    ctx.eval_features = fast.eval if fast else None
    ctx.eval_images = eval_images(ctx, env) if fast is None and writer else None  # under DDP rank 0 evaluates
    t = make_trainer(ctx, env, model, from_features=fast is not None)
    state = runs.load_state(env_dir, t.model, t.optimizer, t.valley, t.scaler)
    step, records, start_best = state["step"], state["records"], state["best"]
    segment, segment_start = segment_average(t.model), step
    batches = fast.batches(step_batches(ctx, env, step)) if fast else prepare_data(ctx, env, step)
    curves = runs.Curves(env_dir, cfg.log if writer else "none", step)
    log.info("%s: held-out %s, steps %d..%d%s", method.name, runs.env_name(ctx.index.domains, env), step, cfg.steps - 1, " (fast Align: cached features)" if fast else "")
    targets_of = batch_targets(ctx)
    losses, tic = [], time.perf_counter()
    for inputs, rows, ks in batches:
        losses.append(train_step(ctx, t, step, inputs.to(ctx.device, non_blocking=True), targets_of(rows, ks)))
        curves.add({"loss": losses[-1]}, step)
        segment.update_parameters(t.model)
        if progress and writer:
            progress(step + 1, cfg.steps)
        if step % cfg.checkpoint_freq == 0 or step == cfg.steps - 1:
            record = {"step": step, "loss": float(np.mean(losses)), "step_time": (time.perf_counter() - tic) / len(losses)}
            record.update(evaluate_once(ctx, t.model, env))
            records.append(record)
            curves.add(record, step)
            log.info("step %d loss %.4f tr_outacc %.3f tr_outloss %.4f", step, record["loss"], record["tr_outacc"], record["tr_outloss"])
            if selection.start_checkpoint(records, cfg.model_save, cfg.steps - 1) is record:
                start_best = record  # what a continuing method (Distill) starts from
                if writer:
                    atomic_torch_save(t.model.state_dict(), env_dir / "best.pt")
            if t.valley is not None:
                t.valley.update_and_evaluate(segment, record["tr_outloss"], segment_start, step)
            if writer:
                runs.save_state(env_dir, t.model, t.optimizer, t.valley, step + 1, records, start_best, t.scaler)
            segment, segment_start, losses, tic = segment_average(t.model), step + 1, [], time.perf_counter()
            if t.valley is not None and t.valley.dead_valley:
                log.info("SWAD: loss valley ended at step %d; stopping early", step)
                break
        step += 1
    curves.close()
    if not writer:
        barrier()  # rank 0 evaluates SWAD and writes the finals
        return {}
    if start_best is None:  # stopped early, before model_save: the last checkpoint is the start
        atomic_torch_save(t.model.state_dict(), env_dir / "best.pt")
    finals = finish_env(ctx, env, t.model, t.valley, records)
    if ctx.ddp:
        barrier()
    return finals


def segment_average(model: Student) -> AveragedModel:
    """A SWAD segment: the running average of every step's weights, as torch's default averaging,
    of the trainable parameters only: a frozen parameter's average is itself, and averaging Align's
    frozen featurizer (22M parameters for ViT-S) at every step costs more than fast Align's whole step."""
    trainable = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    mean = get_swa_avg_fn()

    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        for a, c in zip(averaged, current):
            if c.data_ptr() in trainable:  # `current` holds detached views of the model's own tensors
                a.copy_(mean(a, c, n))

    return AveragedModel(model, multi_avg_fn=average)


def batch_targets(ctx: Context):
    """`(rows, views k) -> StepTargets` of a batch: the labels, and the teacher's embeddings of the
    views shown (gathered from the memory-mapped cache, B rows at a time) or of the plain images."""
    labels = ctx.labels.to(ctx.device)
    views = ctx.views
    image_t = ctx.targets.image.to(ctx.device) if ctx.targets is not None and views is None else None
    text_t = ctx.targets.text.to(ctx.device) if ctx.targets else None
    scale = ctx.targets.logit_scale if ctx.targets else 1.0

    def targets(rows: torch.Tensor, ks: torch.Tensor) -> StepTargets:
        # index_select, not t[rows]: on busy cores the latter's OpenMP region waits for a
        # descheduled thread (8 ms per gather measured on 2 loaded cores, by bench/train.py)
        at = rows.to(ctx.device)
        if views is not None:
            image = views.gather(rows.numpy(), ks.numpy()).to(ctx.device, non_blocking=True)
        else:
            image = image_t.index_select(0, at) if image_t is not None else None
        return StepTargets(labels.index_select(0, at), image, text_t, scale)

    return targets


def evaluate_once(ctx: Context, model: Student, env: int | None) -> dict:
    """The validation record, computed by rank 0 alone under DDP and sent to every rank, so all take
    the same decisions (best.pt, SWAD's valley, early stopping)."""
    if not ctx.ddp:
        return evaluate(ctx, model, env)
    import torch.distributed as dist

    box = [evaluate(ctx, model, env) if launch().rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish_env(ctx: Context, env: int | None, model: Student, valley: LossValley | None, records: list[dict]) -> dict:
    """Final records: training-domain validation selection, and the SWAD model evaluated."""
    env_dir = runs.env_dir(ctx.run_dir, env)
    domain = runs.env_name(ctx.index.domains, env)
    name, rule = selection.SELECTIONS["training-domain"]
    finals = [runs.final_record(name, domain, env, rule(records, env))]
    if valley is not None:
        model.load_state_dict(valley.get_final_model().state_dict())
        model.to(ctx.device)
        if not ctx.cfg.freeze_bn and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            # Averaged weights need their own BatchNorm statistics (SWAD's update_bn); frozen BN
            # layers keep the pretrained ones.
            batches = prepare_data(ctx, env, 0, min(ctx.cfg.steps, BN_UPDATE_STEPS))
            update_bn((images.to(ctx.device) for images, *_ in batches), model)
        atomic_torch_save(model.state_dict(), env_dir / "swad.pt")
        swad = {"step": records[-1]["step"], **evaluate(ctx, model, env)}
        finals.append(runs.final_record(selection.SWAD, domain, env, swad))
    return runs.write_final(env_dir, records, finals)
