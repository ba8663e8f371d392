"""One training loop for both stages of VL2V-ADiP, over every held-out domain, from the cache."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

from vl2v import runs
from vl2v.batches import EvalImages, StepBatches, step_loader
from vl2v.cache import Targets, load_dataset_targets
from vl2v.config import TrainConfig
from vl2v.data import DatasetIndex, all_splits, build_eval_transform, build_train_transform, seed_hash
from vl2v.evaluate import predict_logits
from vl2v.losses import adip_loss
from vl2v.runtime import Progress, UserError, atomic_torch_save, autocast_dtype, barrier, launch, load_checkpoint, resolve_device, seed_everything
from vl2v.student import DataConfig, Student, create_featurizer, create_student
from vl2v.swad import LossValley

log = logging.getLogger(__name__)

BN_UPDATE_STEPS = 32  # training batches that re-estimate BatchNorm statistics of the SWAD model


@dataclass
class Context:
    """What every held-out domain of a run shares."""

    cfg: TrainConfig
    run_dir: Path
    index: DatasetIndex
    targets: Targets
    splits: dict[str, np.ndarray]
    labels: torch.Tensor  # [N] class of every dataset row
    device: torch.device
    amp: torch.dtype | None
    from_run: Path | None  # the Align run a Distill run starts from
    data_cfg: DataConfig | None = None
    eval_images: EvalImages | None = None


def train_run(dataset_root: Path, cache_dir: Path, cfg: TrainConfig, run_dir: Path, from_run: Path | None = None, progress: Progress | None = None) -> dict:
    """Train `cfg.stage` for each held-out domain into `run_dir`; resumes what a killed run left.
    Returns the run's final records per held-out domain."""
    index, targets = load_dataset_targets(dataset_root, cache_dir)
    test_envs = [index.domain_index(d) for d in cfg.test_envs] or list(range(len(index.domains)))
    # Check what can fail before the run directory is made, so the corrected command is not refused.
    create_featurizer(cfg.student, pretrained=False, image_size=cfg.image_size, **cfg.model_kwargs)
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    runs.prepare(run_dir, cfg, index, cache_dir, targets.manifest, from_run)
    labels = torch.tensor([f.label for f in index.files])
    ctx = Context(cfg, run_dir, index, targets, all_splits(index, cfg.trial_seed, cfg.holdout), labels, device, amp, from_run)
    me = launch()  # under torchrun, the held-out domains are shared out between the processes
    for env in test_envs[me.rank :: me.world_size]:
        if runs.read_final(runs.env_dir(run_dir, env)) is None:
            train_env(ctx, env, progress)
    barrier()
    return {index.domains[env]: runs.read_final(runs.env_dir(run_dir, env)) for env in test_envs}


def build_model(ctx: Context, env: int) -> Student:
    """The student of a held-out domain with what its stage freezes; Distill loads its Align model."""
    cfg = ctx.cfg
    distill = cfg.stage == "distill"
    seed_everything(seed_hash(cfg.seed, env))  # initial weights: a function of (seed, held-out domain) alone
    model, data_cfg = create_student(
        cfg.student, ctx.targets.text, ctx.targets.logit_scale, pretrained=cfg.pretrained and not distill, image_size=cfg.image_size, **cfg.model_kwargs
    )
    if distill:
        model.load_state_dict(load_checkpoint(runs.env_dir(ctx.from_run, env) / "best.pt"))
    model.featurizer.requires_grad_(distill)
    model.projection.requires_grad_(not distill)
    ctx.data_cfg = data_cfg
    return model.to(ctx.device)


def set_train_mode(model: Student, freeze_bn: bool) -> None:
    """Training mode, with BatchNorm layers kept in eval mode (their affine weights still train)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def evaluate(ctx: Context, model: Student, env: int) -> dict:
    """DomainBed-style figures: env{i}_{in,out}_acc for every domain, the held-out domain's
    whole-domain accuracy, and the training domains' out-split accuracy and loss (`tr_outloss`)."""
    logits = predict_logits(model, ctx.eval_images, ctx.device, ctx.amp)
    position = {int(r): i for i, r in enumerate(ctx.eval_images.rows)}
    record, train_out = {}, []
    for name, rows in ctx.splits.items():
        pos = torch.tensor([position[int(r)] for r in rows], dtype=torch.long)
        y = ctx.labels[rows]
        record[f"{name}_acc"] = float((logits[pos].argmax(1) == y).float().mean()) if len(rows) else float("nan")
        if name.endswith("_out") and name != f"env{env}_out":
            train_out.append((float(F.cross_entropy(logits[pos], y, reduction="sum")), record[f"{name}_acc"], len(rows)))
    whole = np.concatenate([ctx.splits[f"env{env}_in"], ctx.splits[f"env{env}_out"]])
    pos = torch.tensor([position[int(r)] for r in whole], dtype=torch.long)
    record["test_acc"] = float((logits[pos].argmax(1) == ctx.labels[whole]).float().mean())
    record["tr_outacc"] = float(np.mean([acc for _, acc, _ in train_out]))
    record["tr_outloss"] = float(np.mean([loss / max(n, 1) for loss, _, n in train_out]))
    return record


def prepare_data(ctx: Context, env: int, start: int, stop: int | None = None) -> torch.utils.data.DataLoader:
    """The training batches of steps start..stop-1 (default: to the end); builds the evaluation
    images on first use."""
    cfg, index, data_cfg = ctx.cfg, ctx.index, ctx.data_cfg
    paths = [f.path for f in index.files]
    if ctx.eval_images is None:
        rows = np.sort(np.concatenate(list(ctx.splits.values())))
        size = (3, data_cfg.image_size, data_cfg.image_size)
        transform = build_eval_transform(data_cfg.image_size, data_cfg.mean, data_cfg.std)
        ctx.eval_images = EvalImages(index.root, paths, rows, transform, size, cfg.eval_batch_size, cfg.workers)
    in_splits = [ctx.splits[f"env{d}_in"] for d in range(len(index.domains)) if d != env]
    valid = ctx.targets.valid.numpy()  # a --budget subset cache: batches draw only images with targets
    domain_rows = [rows[valid[rows]] for rows in in_splits]
    if any(len(r) == 0 for r in domain_rows):
        raise UserError("A training domain has no images with teacher targets in its 'in' split; lower --holdout, add images, or embed more of them.")
    transform = build_train_transform(data_cfg.image_size, data_cfg.mean, data_cfg.std)
    batches = StepBatches(index.root, paths, domain_rows, cfg.batch_size, transform, (cfg.seed, env), start, stop or cfg.steps)
    return step_loader(batches, cfg.workers, ctx.device.type == "cuda")


def train_env(ctx: Context, env: int, progress: Progress | None = None) -> dict:
    """Train one held-out domain to the end (or the end of SWAD's loss valley); resumable."""
    cfg, env_dir = ctx.cfg, runs.env_dir(ctx.run_dir, env)
    model = build_model(ctx, env)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    valley = LossValley(cfg.n_converge, cfg.n_tolerance, cfg.tolerance_ratio) if cfg.swad else None
    state = runs.load_state(env_dir, model, optimizer, valley)
    step, records, best = state["step"], state["records"], state["best"]
    segment, segment_start = AveragedModel(model), step
    loader = prepare_data(ctx, env, step)
    image_targets, labels = ctx.targets.image.to(ctx.device), ctx.labels.to(ctx.device)
    text_targets = ctx.targets.text.to(ctx.device)
    log.info("%s: held-out %s, steps %d..%d", cfg.stage, ctx.index.domains[env], step, cfg.steps - 1)
    losses, tic = [], time.perf_counter()
    for images, rows in loader:
        set_train_mode(model, cfg.freeze_bn)
        images, rows = images.to(ctx.device, non_blocking=True), rows.to(ctx.device)
        with torch.autocast(ctx.device.type, dtype=ctx.amp, enabled=ctx.amp is not None):
            embedded = model.embed(images)
        loss = adip_loss(embedded.float(), image_targets[rows], text_targets[labels[rows]], cfg.lmd)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        segment.update_parameters(model)
        if progress:
            progress(step + 1, cfg.steps)
        if step % cfg.checkpoint_freq == 0 or step == cfg.steps - 1:
            record = {"step": step, "loss": float(np.mean(losses)), "step_time": (time.perf_counter() - tic) / len(losses), **evaluate(ctx, model, env)}
            records.append(record)
            log.info("step %d loss %.4f tr_outacc %.3f tr_outloss %.4f test %.3f", step, record["loss"], record["tr_outacc"], record["tr_outloss"], record[f"env{env}_in_acc"])
            if best is None or record["tr_outacc"] > best["tr_outacc"]:
                best = record
                atomic_torch_save(model.state_dict(), env_dir / "best.pt")
            if valley is not None:
                valley.update_and_evaluate(segment, record["tr_outloss"], segment_start, step)
            runs.save_state(env_dir, model, optimizer, valley, step + 1, records, best)
            segment, segment_start, losses, tic = AveragedModel(model), step + 1, [], time.perf_counter()
            if valley is not None and valley.dead_valley:
                log.info("SWAD: loss valley ended at step %d; stopping early", step)
                break
        step += 1
    return finish_env(ctx, env, model, valley, records, best)


def finish_env(ctx: Context, env: int, model: Student, valley: LossValley | None, records: list[dict], best: dict) -> dict:
    """Final records: training-domain validation selection, and the SWAD model evaluated."""
    env_dir = runs.env_dir(ctx.run_dir, env)
    domain = ctx.index.domains[env]
    finals = [runs.final_record("training-domain validation", domain, env, best)]
    if valley is not None:
        model.load_state_dict(valley.get_final_model().state_dict())
        model.to(ctx.device)
        if not ctx.cfg.freeze_bn:
            # Averaged weights need their own BatchNorm statistics (SWAD's update_bn); frozen BN
            # layers keep the pretrained ones.
            batches = prepare_data(ctx, env, 0, min(ctx.cfg.steps, BN_UPDATE_STEPS))
            update_bn((images.to(ctx.device) for images, _ in batches), model)
        atomic_torch_save(model.state_dict(), env_dir / "swad.pt")
        swad = {"step": records[-1]["step"], **evaluate(ctx, model, env)}
        finals.append(runs.final_record("SWAD", domain, env, swad))
    return runs.write_final(env_dir, records, finals)
