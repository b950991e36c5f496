"""Train a diffusers denoiser with Min-SNR weighting, REPA or HASTE, on 1 CPU, N processes or N GPUs.

    python -m fastdiff.training.train --config digits_dit --haste --weighting min_snr
    torchrun --nproc_per_node 2 -m fastdiff.training.train --config digits_dit
    accelerate launch --mixed_precision bf16 -m fastdiff.training.train --config digits_dit   # GPUs / FSDP

The whole loop is this file, top to bottom: config -> accelerator -> model, data, optimizer, EMA ->
resume -> for each step: batch, noise, teacher (while alignment runs), loss, backward, clip, step, EMA ->
log, evaluate, checkpoint. The batch and the noise of step ``s`` are functions of ``(seed, s)`` and the
global batch is split evenly over processes, so a resumed run repeats the uninterrupted loss curve and
N processes reproduce the single-process run.

A run continues a checkpoint in ``output_dir`` only if it was trained with the same configuration
(``max_steps`` aside) or when asked to (``--resume``); otherwise it stops with an error naming both
(:func:`fastdiff.training.checkpoint.resume_point`). Mixed precision is accelerate's (launch flag, config
file) unless ``train.mixed_precision`` sets one; the log says which won. SIGINT / SIGTERM (Ctrl-C) finish
the current step, save a checkpoint and exit with one line (status 130 / 143); a second one aborts.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastdiff.schedule import NoiseSchedule, add_noise, prediction_target
from fastdiff.training.checkpoint import TrainingState, latest_checkpoint, resume_point, save_checkpoint
from fastdiff.training.config import Config, ConfigError, flatten, load_config, validate
from fastdiff.training.datasets import StepBatchSampler, batch_indices, build_dataset
from fastdiff.training.haste import TeacherCache, gradient_cosine
from fastdiff.training.modeling import (
    TrainModule,
    build_alignment,
    build_class_embedder,
    build_model,
    build_null_context,
    build_scheduler,
    is_flow,
    needs_context,
    null_label,
    num_parameters,
    patch_tokens,
    resolve_conditioning,
)
from fastdiff.training.tracking import JSONLTracker
from fastdiff.training.weighting import (
    diffusion_loss,
    min_snr_floor,
    sample_timesteps,
    scheduler_prediction_type,
)

logger = logging.getLogger("fastdiff.training")
StepCallback = Callable[[int, dict], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; raised before the optimizer step that would use it."""


class LaunchError(ValueError):
    """The launcher did not start the processes it was asked for (see :func:`check_launch`)."""


def check_launch(environ=os.environ) -> None:
    """Refuse a CPU ``accelerate launch --num_processes N`` (N > 1) that started one process only.

    accelerate starts several CPU processes only through MPI (``--mpirun_hostfile``); without it
    ``accelerate launch --cpu --num_processes 2`` runs the script once, with ``MASTER_ADDR`` set but no
    ``WORLD_SIZE``, and training would silently run on one process.
    """
    launched_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    distributed = any(k in environ for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if launched_cpu and "MASTER_ADDR" in environ and not distributed:
        raise LaunchError("accelerate launch --cpu --num_processes N (N > 1) started a single process: accelerate runs "
                          "several CPU processes only through MPI (--mpirun_hostfile). Use `torchrun "
                          "--nproc_per_node N -m fastdiff.training.train ...` (gloo DDP on CPU) or --num_processes 1")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :func:`train` after ``step`` steps; ``checkpoint`` holds that state and
    ``summary`` what :func:`train` would have returned so far."""

    def __init__(self, signum: int, step: int, checkpoint: Path, summary: dict) -> None:
        super().__init__(f"{signal.Signals(signum).name} after step {step}; saved {checkpoint}")
        self.signum, self.step, self.checkpoint, self.summary = signum, step, checkpoint, summary


class StopSignals:
    """While active (main thread only), the first SIGINT / SIGTERM is recorded in ``received`` instead of
    killing the process, so the loop can finish its step and checkpoint; a second one raises
    ``KeyboardInterrupt`` at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers share the terminal's Ctrl-C: leave it to the main process, which checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def mixed_precision_choice(configured: str | None, environ=os.environ) -> tuple[str | None, str]:
    """``(value for Accelerator, note)``: the fastdiff config's ``train.mixed_precision`` if it sets one, else
    ``None`` so that accelerate's own setting applies (``accelerate launch --mixed_precision``, its config
    file, ``ACCELERATE_MIXED_PRECISION``: launch passes the first two on as the third)."""
    launched = environ.get("ACCELERATE_MIXED_PRECISION")
    if configured is None:
        if launched:
            return None, f"mixed precision {launched} (accelerate's setting; train.mixed_precision is unset)"
        return None, "mixed precision no (neither train.mixed_precision nor accelerate sets one)"
    if launched and launched != configured:
        return configured, f"mixed precision {configured} (train.mixed_precision overrides accelerate's {launched})"
    return configured, f"mixed precision {configured} (train.mixed_precision)"


def step_randomness(cfg: Config, step: int, schedule: NoiseSchedule, sample_shape: tuple[int, ...]):
    """Timesteps, noise and label-dropout mask of the *global* batch of ``step``, a function of (seed, step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    t = cfg.train
    timesteps = sample_timesteps(t.batch_size, schedule, t.timestep_sampling, generator=gen, logit_mean=t.logit_mean,
                                 logit_std=t.logit_std, mode_scale=t.mode_scale)
    noise = torch.randn((t.batch_size, *sample_shape), generator=gen)
    drop = torch.rand(t.batch_size, generator=gen) < cfg.data.class_dropout
    return timesteps, noise, drop


def train(cfg: Config, callbacks: Sequence[StepCallback] = ()) -> dict:
    """Run training as configured; returns a summary (losses per step, evaluations, throughput, memory)."""
    validate(cfg)
    check_launch()
    out_dir = Path(cfg.output_dir)
    terminates = cfg.align.haste and (cfg.align.stop_step is not None or cfg.align.grad_angle_deg is not None)

    # ---------------------------------------------------------------------------------- accelerator
    mixed_precision, precision_note = mixed_precision_choice(cfg.train.mixed_precision)
    accelerator = Accelerator(
        cpu=cfg.cpu or not _has_accelerator(),  # cpu=True is what makes torchrun'd CPU processes use gloo DDP
        mixed_precision=mixed_precision,
        log_with=[JSONLTracker("logs", out_dir) if name == "jsonl" else name for name in cfg.log.trackers],
        project_dir=str(out_dir),
        # the REPA projector goes unused after a stage-wise termination
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=terminates)],
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by {world} processes")
    local_batch = cfg.train.batch_size // world
    accelerator.print(precision_note)
    # the configuration as run (the effective mixed precision), stored with every checkpoint
    run_config = cfg.to_dict()
    run_config["train"]["mixed_precision"] = accelerator.mixed_precision
    ckpt_root = out_dir / "checkpoints"
    resume_dir, resume_note = resume_point(cfg.checkpoint.resume, ckpt_root, flatten(run_config),
                                           flatten(Config().to_dict()))
    set_seed(cfg.seed)  # identical initialisation on every process

    # ------------------------------------------------------------------------- model, data, optimizer
    scheduler = build_scheduler(cfg)
    schedule = NoiseSchedule.from_config(scheduler)
    prediction_type = scheduler_prediction_type(scheduler)
    snr_floor = min_snr_floor(cfg.train.min_snr_floor, schedule, cfg.train.weighting)
    model = build_model(cfg)
    conditioning = resolve_conditioning(model, cfg.model.conditioning)
    class_embedder = build_class_embedder(model, cfg.model.num_classes, cfg.seed) if conditioning == "class_tokens" else None
    if conditioning == "none" and needs_context(model):  # PixArt & co. cannot run without a context
        class_embedder = build_null_context(model)
    alignment = build_alignment(cfg, model, device)
    module = TrainModule(model, conditioning, class_embedder, alignment)
    denoiser_params = [p for m in (model, class_embedder) if m is not None for p in m.parameters() if p.requires_grad]
    flow = is_flow(model)  # a normalizing flow: maximum likelihood of noise-augmented images, no diffusion noise
    null = cfg.model.num_classes if flow else null_label(conditioning, cfg.model.num_classes)
    student_tokens = patch_tokens(model, cfg.data.resolution) if alignment is not None else 0
    teacher_cache = TeacherCache() if alignment is not None and cfg.align.cache_teacher else None
    run_teacher = functools.partial(alignment.run_teacher, student_tokens=student_tokens) if alignment else None

    dataset = build_dataset(cfg.data.dataset, cfg.data.path, cfg.data.split, cfg.data.resolution, cfg.data.channels)
    sample_shape = tuple(dataset[0][0].shape)

    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg.train))
    ema = None
    if cfg.train.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(denoiser_params, decay=cfg.train.ema_decay, use_ema_warmup=True, power=2 / 3)
        ema.to(device)

    # the LR schedule is not prepared: accelerate would step it once per process, we step it per global step
    module, optimizer = accelerator.prepare(module, optimizer)
    state = TrainingState()
    for obj in (state, lr_schedule, ema):
        if obj is not None:
            accelerator.register_for_checkpointing(obj)

    # ------------------------------------------------------------------------------------------- resume
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        if alignment is not None and alignment.termination is not None and state.termination:
            alignment.termination.load_state_dict(state.termination)
        accelerator.print(f"resumed from {resume_dir} at step {state.step} {resume_note}".rstrip())

    accelerator.init_trackers(cfg.log.project, config=flatten(run_config))
    if accelerator.is_main_process:  # the steps after the checkpoint are replayed: drop their old records
        for tracker in accelerator.trackers:
            if isinstance(tracker, JSONLTracker):
                tracker.truncate_after(state.step)
    accelerator.print(f"training {type(model).__name__} ({num_parameters(model)} params, {conditioning}) on "
                      f"{cfg.data.dataset} ({len(dataset)} images), {world} process(es) on {device.type}, global batch "
                      f"{cfg.train.batch_size}, weighting={cfg.train.weighting}, "
                      f"alignment={'haste' if cfg.align.haste else 'repa' if cfg.align.repa else 'none'}")

    sampler = StepBatchSampler(len(dataset), cfg.train.batch_size, cfg.seed, state.step, cfg.train.max_steps,
                               rank, world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        worker_init_fn=_ignore_sigint if cfg.data.num_workers else None)
    progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not (accelerator.is_local_main_process and cfg.log.progress_bar))
    summary: dict = {"losses": {}, "evals": [], "teacher_calls": 0, "teacher_images": 0,
                     "resumed_from": str(resume_dir or ""), "mixed_precision": accelerator.mixed_precision}
    interrupted: tuple[int, Path] | None = None
    train_time, window_start, window_samples = 0.0, time.perf_counter(), 0

    # ---------------------------------------------------------------------------------------- the loop
    def checkpoint(step: int) -> Path:
        if termination is not None:
            state.termination = termination.state_dict()
        return save_checkpoint(accelerator, ckpt_root, step, cfg.checkpoint.keep, config=run_config)

    termination = alignment.termination if alignment is not None else None
    with StopSignals() as stop:
        for images, labels in loader:
            step, tic = state.step, time.perf_counter()
            logged, saved = False, None
            module.train()
            timesteps, noise, drop = step_randomness(cfg, step, schedule, sample_shape)
            mine = slice(rank * local_batch, (rank + 1) * local_batch)
            images, labels = images.to(device), labels.to(device)
            timesteps, noise, drop = timesteps[mine].to(device), noise[mine].to(device), drop[mine].to(device)
            if null is not None:
                labels = torch.where(drop, torch.full_like(labels, null), labels)
            alpha, sigma = schedule.alpha(timesteps).float(), schedule.sigma(timesteps).float()
            noisy = add_noise(images, noise, alpha, sigma)
            target = prediction_target(images, noise, alpha, sigma, prediction_type)

            teacher_out = None
            if alignment is not None and alignment.active(step):  # after termination the teacher never runs
                if teacher_cache is not None:
                    indices = batch_indices(step, cfg.train.batch_size, len(dataset), cfg.seed)[mine]
                    teacher_out, ran = teacher_cache(indices.tolist(), images, run_teacher)
                else:
                    teacher_out, ran = run_teacher(images), len(images)
                summary["teacher_calls"] += int(ran > 0)
                summary["teacher_images"] += ran
            if flow:
                denoise, aux = module(images, noise, labels)
            else:
                prediction, aux = module(noisy, timesteps, labels, teacher_out)
                denoise = diffusion_loss(prediction, target, timesteps, schedule, cfg.train.weighting,
                                         cfg.train.min_snr_gamma, prediction_type, floor=snr_floor)
            loss = denoise + aux["align"] if aux else denoise

            loss_mean = accelerator.reduce(loss.detach().float(), "mean")
            if not torch.isfinite(loss_mean):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss_mean.item()}) at step {step} (denoising loss {denoise.item()}"
                    + "".join(f", {k} {v.item()}" for k, v in aux.items()) + "); the last good checkpoint is "
                    f"{latest_checkpoint(ckpt_root)}. Lower train.lr, enable train.grad_clip or use fp32.")
            grad_cos = None
            if aux and termination is not None and termination.wants_gradient_angle(step):
                grad_cos = gradient_cosine(denoise, aux["align"], list(model.parameters()))
                grad_cos = accelerator.reduce(torch.tensor(grad_cos, device=device), "mean").item()
                termination.report_gradient_cosine(step, grad_cos)

            accelerator.backward(loss)
            # the norm before clipping (grad_clip 0: measured, nothing clipped)
            grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.train.grad_clip or math.inf)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(denoiser_params)
            state.step += 1
            state.samples_seen += cfg.train.batch_size
            train_time += time.perf_counter() - tic
            window_samples += cfg.train.batch_size

            # ------------------------------------------------------------------ log, evaluate, checkpoint
            # "loss" is the denoising loss; the alignment terms (negative cosines) are logged beside it
            record = {"loss": accelerator.reduce(denoise.detach().float(), "mean").item(), "loss/total": loss_mean.item()}
            record.update({f"loss/{k}": accelerator.reduce(v.detach(), "mean").item() for k, v in aux.items() if k != "align"})
            record["grad_norm"] = float(grad_norm)
            if grad_cos is not None:
                record["align/grad_cos"] = grad_cos
            summary["losses"][step] = record["loss"]
            progress.update(1)
            progress.set_postfix(progress_postfix(record), refresh=False)
            if state.step % cfg.log.every == 0 or state.step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                record.update({"lr": lr_schedule.get_last_lr()[0], "throughput/img_per_s": window_samples / elapsed,
                               "align/active": float(teacher_out is not None)})
                accelerator.log(record, step=state.step)
                logged = True
                window_start, window_samples = time.perf_counter(), 0
            elif grad_cos is not None:  # measured off a log step: recorded at its own step all the same
                accelerator.log({"align/grad_cos": grad_cos}, step=state.step)
            if cfg.eval.every and (state.step % cfg.eval.every == 0 or state.step == cfg.train.max_steps):
                result = evaluate(accelerator, module, ema, denoiser_params, scheduler, cfg)
                if result is not None:
                    summary["evals"].append({"step": state.step, **result})
                    accelerator.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}, step=state.step)
                    (progress.write if not progress.disable else accelerator.print)(eval_line(state.step, result))
                window_start = time.perf_counter()
            if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or state.step == cfg.train.max_steps:
                saved = checkpoint(state.step)
                window_start = time.perf_counter()
            for callback in callbacks:
                callback(step, record)
            signum = stop.received or 0
            if world > 1:  # every process stops after the same step: checkpointing is collective
                signum = int(accelerator.gather(torch.tensor([signum], device=device)).max())
            if signum and state.step < cfg.train.max_steps:  # (after the last step: finish normally)
                if not logged:  # (a gradient cosine off a log step is recorded already)
                    accelerator.log({k: v for k, v in record.items() if k != "align/grad_cos"}, step=state.step)
                interrupted = (signum, saved or checkpoint(state.step))
                break

    # --------------------------------------------------------------------------------------- wrap up
    progress.close()
    if interrupted is not None:
        del module, optimizer
        end_run(accelerator)
        signum, saved = interrupted
        raise TrainingInterrupted(signum, state.step, saved, summary)
    steps_run = len(summary["losses"])
    summary.update({
        "final_step": state.step,
        "train_seconds": train_time,
        "throughput_img_per_s": steps_run * cfg.train.batch_size / train_time if train_time else None,
        "peak_memory_mb": peak_memory_mb(device),
        "terminated_at": alignment.termination.terminated_at if alignment is not None and alignment.termination else None,
        "num_processes": world,
    })
    if accelerator.is_main_process:
        export_model(accelerator.unwrap_model(module), ema, denoiser_params, scheduler, out_dir)
    accelerator.print(f"done: step {state.step}, {summary['throughput_img_per_s'] or 0:.1f} img/s, "
                      f"peak memory {summary['peak_memory_mb']:.0f} MB")
    del module, optimizer
    end_run(accelerator)
    return summary


def end_run(accelerator: Accelerator) -> None:
    """Release the prepared (DDP) model, then end the process group. DDP's Reducer holds the gloo group: freed
    only when ``train``'s frame goes, after ``destroy_process_group``, its destructor can hang rank 0 joining
    the group's threads (seen with 2 CPU processes)."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


# ------------------------------------------------------------------------------------------ helpers
def progress_postfix(record: dict) -> dict[str, str]:
    """The progress bar's fields: the denoising ``loss``, then each alignment term, then the gradient norm."""
    fields = {"loss": f"{record['loss']:.4f}"}
    fields.update({k.split("/", 1)[1]: f"{v:.3f}" for k, v in record.items()
                   if k.startswith("loss/") and k != "loss/total"})
    fields["grad"] = f"{record['grad_norm']:.3g}"
    return fields


def eval_line(step: int, result: dict) -> str:
    """One printed line per evaluation: ``step 500: FD-digits 12.34, class accuracy 0.912 (500 samples)``."""
    accuracy = "" if result.get("accuracy") is None else f", class accuracy {result['accuracy']:.3f}"
    return f"step {step}: {result.get('metric', 'FD')} {result['fd']:.2f}{accuracy} ({result['num_samples']} samples)"


def lr_factor(step: int, cfg) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then constant or cosine down to ``min_lr_ratio``."""
    warmup = max(1, cfg.warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _has_accelerator() -> bool:
    available = getattr(torch, "accelerator", None)
    return available.is_available() if available is not None else torch.cuda.is_available()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or on CPU the process's peak resident set size (whole process lifetime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _swap_in_ema(ema, params):
    if ema is None:
        return lambda: None
    ema.store(params)
    ema.copy_to(params)
    return lambda: ema.restore(params)


@torch.no_grad()
def evaluate(accelerator: Accelerator, module: torch.nn.Module, ema, params, scheduler, cfg: Config) -> dict | None:
    """FD-digits and class accuracy of ``eval.num_samples`` samples (main process; the others wait)."""
    inner = accelerator.unwrap_model(module)
    result = None
    unconditional = inner.conditioning == "none" and inner.class_embedder is not None  # the null context
    if accelerator.is_main_process and cfg.data.dataset == "digits" and (inner.conditioning == "class_tokens"
                                                                         or unconditional):
        from fastdiff.metrics import evaluate_samples

        restore = _swap_in_ema(ema if cfg.eval.use_ema else None, params)
        inner.eval()
        try:
            pipe = sampling_pipeline(inner, scheduler)
            labels = torch.arange(cfg.eval.num_samples) % cfg.model.num_classes
            gen = torch.Generator().manual_seed(cfg.eval.seed)
            latents = torch.randn((len(labels), *sample_shape_of(inner)), generator=gen)
            prompts = torch.zeros_like(labels) if unconditional else labels  # label 0: the null context
            images = pipe(prompts.tolist(), num_inference_steps=cfg.eval.inference_steps,
                          guidance_scale=1.0 if unconditional else cfg.eval.guidance_scale,
                          latents=latents.to(accelerator.device), output_type="pt").images
            metrics = evaluate_samples(images.float().cpu(), None if unconditional else labels, value_range=(0, 1),
                                       metric="digits")
            result = {"fd": metrics.fd, "accuracy": metrics.accuracy, "metric": metrics.metric,
                      "num_samples": len(labels)}
        finally:
            restore()
            inner.train()
    accelerator.wait_for_everyone()
    return result


def sample_shape_of(inner: TrainModule) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one sample of the denoiser (``sample_size`` an int or a pair)."""
    c = inner.model.config
    size = c.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (c.in_channels, height, width)


# class-token denoisers exported as a sampling pipeline (fastdiff.models.digits.digits_pipeline_for)
_PIPELINE_MODELS = ("PixArtTransformer2DModel", "UNet2DConditionModel")


def sampling_pipeline(inner: TrainModule, scheduler):
    """A ``DigitsPipeline`` (transformers) or ``DigitsUNetPipeline`` (``UNet2DConditionModel``) around the trained
    denoiser and class embedder (DDIM / flow-match Euler)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from fastdiff.models.digits import digits_pipeline_for

    sampler_cls = FlowMatchEulerDiscreteScheduler if "FlowMatch" in type(scheduler).__name__ else DDIMScheduler
    pipe = digits_pipeline_for(inner.model, inner.class_embedder, sampler_cls.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_model(inner: TrainModule, ema, params, scheduler, out_dir: Path) -> None:
    """Save the final (EMA) weights: a ``DigitsPipeline`` / ``DigitsUNetPipeline`` (``pipeline/``) for class-token
    PixArt transformers and ``UNet2DConditionModel``, else the model and its scheduler (``model/``,
    ``scheduler/``); unconditional PixArt / ``UNet2DConditionModel`` runs write both, the pipeline holding the
    zero context as its only class (label 0)."""
    restore = _swap_in_ema(ema, params)
    try:
        # unconditional (conditioning: none) cross-attention models: the pipeline's class embedder is the
        # one-class all-zero context, so ``pipe(0, num_images_per_prompt=n)`` samples as evaluation does
        pipelined = type(inner.model).__name__ in _PIPELINE_MODELS and inner.class_embedder is not None
        if pipelined:
            sampling_pipeline(inner, scheduler).save_pretrained(out_dir / "pipeline")
        if not (pipelined and inner.conditioning == "class_tokens"):  # also RUN/model for model.pretrained
            inner.model.save_pretrained(out_dir / "model")
            scheduler.save_pretrained(out_dir / "scheduler")
    finally:
        restore()


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point (``python -m fastdiff.training.train``)."""
    return run(load_config(None, sys.argv[1:] if argv is None else argv))


def run(cfg: Config) -> dict:
    """:func:`train` for the command line (also ``fastdiff train``, which parses the config before torch is
    imported). Ctrl-C / SIGTERM: one line saying where the checkpoint is, then ``SystemExit(128 + signal)``."""
    main_process = os.environ.get("RANK", "0") == "0"
    try:
        return train(cfg)
    except (ConfigError, LaunchError) as err:  # one line per problem, no traceback
        if main_process:
            print(f"fastdiff train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingInterrupted as stop:
        if main_process:
            print(f"fastdiff train: {signal.Signals(stop.signum).name} after step {stop.step}: saved {stop.checkpoint}; "
                  "run the same command again to continue", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt:
        if main_process:
            last = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
            print(f"fastdiff train: interrupted, nothing saved; the last checkpoint is {last or 'none'}",
                  file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


__all__ = ["LaunchError", "NonFiniteLossError", "StopSignals", "TrainingInterrupted", "check_launch", "main",
           "mixed_precision_choice", "run", "train"]

if __name__ == "__main__":
    main()
