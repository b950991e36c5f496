"""Parallel sampling of diffusers pipelines: ``fastdiff.parallel_sample(pipe, ...)``.

The pipeline runs its own ``__call__`` (prompt encoding, latents, guidance set-up, decoding, output types),
with its denoising loop cut to a single iteration: ``scheduler.set_timesteps`` keeps only the first
timestep, the model call of that iteration is recorded, and ``scheduler.step`` solves the whole trajectory
with :func:`fastdiff.samplers.parallel.sample_parallel`, calling the model on windows of timesteps with the
recorded conditioning repeated (classifier-free guidance batched with the window). The first iteration's
model output is the solver's step 0, so nothing is computed twice. Everything is restored afterwards.

Supported: the embedded ``DigitsPipeline``, ``DDPMPipeline``, ``DDIMPipeline``, ``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline``/``PixArtSigmaPipeline`` and ``DiTPipeline``, with any
scheduler that has a step map (:func:`fastdiff.samplers.steps.supported_schedulers`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput

from .parallel import ParallelStats, check_options, sample_parallel, split_denoiser
from .steps import Denoiser, draw_noise, step_map_for, supported_schedulers


@dataclass(frozen=True)
class _Adapter:
    """How a pipeline turns its recorded model call into a batched denoiser."""

    model: str  # attribute holding the denoising network
    guidance: str  # "cfg": [uncond; cond] batch (SD, PixArt); "dit": DiT's doubled state; "none"; "digits"
    learned_sigma: bool = False  # drop the variance channels when out_channels == 2 * in_channels
    rescale: bool = False  # SD's guidance_rescale (Lin et al. 2024, sec. 3.4)


_ADAPTERS: dict[str, _Adapter] = {
    "DigitsPipeline": _Adapter("transformer", "digits"),
    "DigitsUNetPipeline": _Adapter("unet", "digits"),  # a DigitsPipeline subclass: found first in the MRO
    "DDPMPipeline": _Adapter("unet", "none"),
    "DDIMPipeline": _Adapter("unet", "none"),
    "StableDiffusionPipeline": _Adapter("unet", "cfg", rescale=True),
    "StableDiffusionXLPipeline": _Adapter("unet", "cfg", rescale=True),
    "PixArtAlphaPipeline": _Adapter("transformer", "cfg", learned_sigma=True),
    "PixArtSigmaPipeline": _Adapter("transformer", "cfg", learned_sigma=True),
    "DiTPipeline": _Adapter("transformer", "dit", learned_sigma=True),
}


def supported_pipelines() -> list[str]:
    return sorted(_ADAPTERS)


@dataclass
class ParallelPipelineOutput(BaseOutput):
    """What :func:`parallel_sample` returns: the pipeline's images and the run's statistics.

    Args:
        images: the pipeline's images, in its ``output_type`` (PIL list, numpy array or tensor).
        stats: the parallel solve's cost and convergence (:class:`~fastdiff.samplers.parallel.ParallelStats`).
        nsfw_content_detected: Stable Diffusion's safety-checker flags, when the pipeline returned them.

    A ``BaseOutput``: fields by attribute or key, and ``to_tuple()`` (what ``return_dict=False`` returns)
    gives ``(images, stats)``, then ``nsfw_content_detected`` where present.
    """

    images: list | np.ndarray | torch.Tensor
    stats: ParallelStats
    nsfw_content_detected: list[bool] | None = None


def parallel_sample(
    pipe: Any,
    *args: Any,
    method: str = "newton",
    window: int | None = None,
    tolerance: float | None = None,
    init: str = "gaussian",
    max_rounds: int | None = None,
    sync_every: int = 1,
    distributed: bool | None = None,
    pcm: Any = None,
    **pipe_kwargs: Any,
) -> ParallelPipelineOutput | tuple:
    """``pipe(*args, **pipe_kwargs)``, sampled by a parallel-in-time fixed-point solve.

    Takes the pipeline's own arguments and returns a :class:`ParallelPipelineOutput` (``.images``, and the
    run's :class:`~fastdiff.samplers.parallel.ParallelStats` as ``.stats``), or with ``return_dict=False`` its
    tuple ``(images, stats[, nsfw_content_detected])``. ``method``, ``window``, ``tolerance``, ``init``,
    ``max_rounds`` and ``sync_every`` are those of :func:`~fastdiff.samplers.parallel.sample_parallel` (a run
    that ``max_rounds`` stops before convergence warns); ``tolerance=0`` gives the images ``pipe(...)`` gives
    (to float precision), stochastic schedulers included, for the same ``generator``. ``window`` counts
    trajectory points per model call (the model batch is ``window x batch x 2`` with guidance).
    ``distributed`` splits each window across the ``torch.distributed`` processes (default: when a process
    group with more than one process is initialised); every process then returns the same images.
    Step callbacks (``callback_on_step_end``) run once, after the solve, on the final latents.
    ``pcm`` (a :class:`fastdiff.samplers.pcm.PicardConsistencyModel`, a
    :class:`fastdiff.samplers.pcm.residual.ResidualPCM` (fastdiff's iterate-residual option), either's directory,
    or ``"embedded"`` for the shipped digits PCM) accelerates the first rounds by PCM model switching, with any
    ``method``; the
    result still converges to the base model's (``stats.switch_round``: the first round on the base model).
    """
    adapter = _adapter_for(pipe)
    check_options(method, window, tolerance, init, max_rounds, sync_every)  # before the pipeline runs
    _check_scheduler(pipe.scheduler)
    if pcm is not None:
        from .pcm import resolve_pcm

        pcm = resolve_pcm(pcm)
        pcm.check_base(getattr(pipe, adapter.model), pipe.scheduler)
    if pipe_kwargs.get("denoising_end") is not None:
        raise ValueError("denoising_end is not supported by parallel sampling")
    signature = inspect.signature(type(pipe).__call__)
    call = signature.bind(pipe, *args, **pipe_kwargs)
    call.apply_defaults()
    return_dict = call.arguments.get("return_dict", True)
    run_call = signature.bind(pipe, *args, **pipe_kwargs)  # the pipeline's own call, returning its dataclass
    if "return_dict" in signature.parameters:
        run_call.arguments["return_dict"] = True
    options = dict(method=method, window=window, tolerance=tolerance, init=init, max_rounds=max_rounds,
                   sync_every=sync_every)
    run = _ParallelRun(pipe, adapter, dict(call.arguments), options, distributed, pcm)
    with run:
        output = pipe(*run_call.args[1:], **run_call.kwargs)
    if run.stats is None:
        raise RuntimeError(f"{type(pipe).__name__} never called scheduler.step; nothing was sampled")
    result = ParallelPipelineOutput(stats=run.stats, **dict(output.items()))
    return result if return_dict else result.to_tuple()


def _adapter_for(pipe: Any) -> _Adapter:
    for cls in type(pipe).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise ValueError(
        f"parallel_sample does not support {type(pipe).__name__}; supported pipelines: {', '.join(supported_pipelines())}"
    )


def _check_scheduler(scheduler: Any) -> None:
    names = supported_schedulers()
    if not any(c.__name__ in names for c in type(scheduler).__mro__):
        raise ValueError(
            f"parallel sampling does not support scheduler {type(scheduler).__name__}; supported schedulers: "
            f"{', '.join(names)}"
        )


# ------------------------------------------------------------------------------------------- the patching
class _ParallelRun:
    """Context manager: cut the pipeline's loop to one iteration and solve the trajectory in ``step``."""

    def __init__(self, pipe: Any, adapter: _Adapter, call: dict, options: dict, distributed: bool | None,
                 pcm: Any = None) -> None:
        self.pipe, self.adapter, self.call, self.options, self.pcm = pipe, adapter, call, options, pcm
        self.distributed = distributed
        self.scheduler = pipe.scheduler
        self.model = getattr(pipe, adapter.model)
        self.recorded: tuple[tuple, dict] | None = None
        self.full_timesteps: torch.Tensor | None = None
        self.stats: ParallelStats | None = None
        self.solving = False
        self.undo: list[Callable[[], None]] = []

    def __enter__(self) -> _ParallelRun:
        sched = self.scheduler
        original_set, original_step = sched.set_timesteps, sched.step

        @functools.wraps(original_set)
        def set_timesteps(*a: Any, **kw: Any) -> Any:
            result = original_set(*a, **kw)
            self.full_timesteps = sched.timesteps
            sched.timesteps = sched.timesteps[:1]
            return result

        @functools.wraps(original_step)
        def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *a: Any, **kw: Any) -> Any:
            if self.stats is not None:
                raise RuntimeError("parallel_sample: the pipeline stepped twice; its loop is not supported")
            self.solving = True
            try:
                latents = self.solve(model_output, sample, a, kw)
            finally:
                self.solving = False
            if kw.get("return_dict", True):
                from diffusers.schedulers.scheduling_utils import SchedulerOutput

                return SchedulerOutput(prev_sample=latents)
            return (latents,)

        sched.set_timesteps, sched.step = set_timesteps, step
        self.undo.append(lambda: [sched.__dict__.pop(n, None) for n in ("set_timesteps", "step")])
        if self.adapter.guidance == "digits":
            original_predict = self.pipe.predict_noise

            def predict_noise(latents, t, encoder_hidden_states, guidance_scale=2.0):
                if not self.solving:
                    self.recorded = ((latents, t, encoder_hidden_states, guidance_scale), {})
                return original_predict(latents, t, encoder_hidden_states, guidance_scale)

            self.pipe.predict_noise = predict_noise
            self.predict = original_predict
            self.undo.append(lambda: self.pipe.__dict__.pop("predict_noise", None))
        else:
            def record(module: Any, args: tuple, kwargs: dict) -> None:
                if not self.solving:
                    self.recorded = (args, kwargs)

            handle = self.model.register_forward_pre_hook(record, with_kwargs=True)
            self.undo.append(handle.remove)
        return self

    def __exit__(self, *exc: Any) -> None:
        for fn in reversed(self.undo):
            fn()
        if self.full_timesteps is not None:
            self.scheduler.timesteps = self.full_timesteps

    # ---------------------------------------------------------------- the solve, inside scheduler.step
    def solve(self, model_output: torch.Tensor, sample: torch.Tensor, a: tuple, kw: dict) -> torch.Tensor:
        sched = self.scheduler
        sched.timesteps = self.full_timesteps
        step_kwargs = dict(zip(("eta", "use_clipped_model_output"), a)) if a else {}
        step_kwargs.update({k: v for k, v in kw.items() if k in ("eta", "use_clipped_model_output") and v is not None})
        sm = step_map_for(sched, **step_kwargs)
        sched.timesteps = self.full_timesteps[:1]
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(dtype)
        noise = draw_noise(sm, tuple(x.shape), kw.get("generator"), device=x.device, dtype=sample.dtype)
        denoiser = self.denoiser(state_batch=x.shape[0])
        split = self.distributed or (self.distributed is None and _world_size() > 1)
        if split:
            denoiser = split_denoiser(denoiser, x.shape[0])
        switch = None
        if self.pcm is not None:  # PCM's model switching: the same glue around the PCM network
            def glue(network: Any) -> Denoiser:
                d = self.denoiser(state_batch=x.shape[0], network=network)
                return split_denoiser(d, x.shape[0]) if split else d

            switch = self.pcm.switch(glue, self.model)
        with self.pipe.progress_bar(total=sm.num_steps) as bar:
            bar.set_description(f"parallel {self.options['method']}: steps accepted")
            out, self.stats = sample_parallel(
                sm, denoiser, x, None if noise is None else noise.to(dtype), first_output=model_output.to(dtype),
                progress=lambda done: bar.update(done - bar.n), model_switch=switch, **self.options,
            )
        return out.to(sample.dtype)

    def denoiser(self, state_batch: int, network: Any = None) -> Denoiser:
        """``f(u [n*S, ...], t [n*S]) -> model_output [n*S, ...]`` reproducing one loop iteration for ``n``
        trajectory points of ``S`` state samples each (with ``network`` in place of the pipeline's model)."""
        if self.recorded is None:
            raise RuntimeError("parallel_sample: the pipeline's model call was not observed")
        args, kwargs = self.recorded
        ad = self.adapter
        if ad.guidance == "digits":
            _, _, ehs, scale = args
            predict = self.predict
            if network is not None:
                from .pcm import using_network

                def predict(*a: Any, _p=self.predict) -> torch.Tensor:
                    with using_network(self.pipe, ad.model, network):
                        return _p(*a)
            return functools.partial(_digits_denoiser, predict, ehs, scale, state_batch)
        first = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        rest_args, kw = list(args[1:]), {k: v for k, v in kwargs.items() if k not in ("sample", "hidden_states")}
        model_batch = first.shape[0]
        guidance = self.call.get("guidance_scale", 1.0) or 1.0
        rescale = float(self.call.get("guidance_rescale", 0.0) or 0.0) if ad.rescale else 0.0
        latent_channels = first.shape[1] if first.ndim > 1 else None
        split_sigma = ad.learned_sigma and getattr(self.model.config, "out_channels", 0) == 2 * latent_channels
        if ad.guidance == "cfg":
            mode = "cfg" if model_batch == 2 * state_batch else "none"
        elif ad.guidance == "dit":
            mode = "dit" if guidance > 1 else "none"
        else:
            mode = "none"
        model, dtype = (self.model if network is None else network), first.dtype

        def denoise(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            n = u.shape[0] // state_batch
            uv, tv = u.view(n, state_batch, *u.shape[1:]), t.view(n, state_batch)
            if mode == "cfg":
                uv, tv = torch.cat([uv, uv], 1), torch.cat([tv, tv], 1)
            elif mode == "dit":
                half = state_batch // 2
                uv, tv = torch.cat([uv[:, :half], uv[:, :half]], 1), torch.cat([tv[:, :half], tv[:, :half]], 1)
            inputs, times = uv.flatten(0, 1).to(dtype), tv.flatten(0, 1)
            call_args = [_repeat(v, n, model_batch) for v in rest_args]
            call_kwargs = {k: _repeat(v, n, model_batch) for k, v in kw.items()}
            if "timestep" in call_kwargs or not call_args:
                call_kwargs["timestep"] = times
            else:
                call_args[0] = times
            out = model(inputs, *call_args, **call_kwargs)
            out = (out[0] if isinstance(out, tuple) else out.sample).to(u.dtype)
            out = out.view(n, -1, *out.shape[1:])
            if mode == "cfg":
                uncond, cond = out.chunk(2, dim=1)
                out = uncond + guidance * (cond - uncond)
                if rescale > 0:
                    out = _rescale_cfg(out, cond, rescale)
            elif mode == "dit":
                c = latent_channels
                eps, rest = out[:, :, :c], out[:, :, c:]
                cond, uncond = eps.chunk(2, dim=1)
                half_eps = uncond + guidance * (cond - uncond)
                out = torch.cat([torch.cat([half_eps, half_eps], 1), rest], 2)
            if split_sigma:
                out = out[:, :, :latent_channels]
            return out.flatten(0, 1)

        return denoise


def _digits_denoiser(predict: Callable, ehs: torch.Tensor, scale: float, batch: int, u: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """The embedded pipeline: ``predict_noise`` on a window (its CFG batch is ``[uncond; cond]``)."""
    n = u.shape[0] // batch
    if ehs.shape[0] == 2 * batch:
        ehs = torch.cat([ehs[:batch].repeat(n, 1, 1), ehs[batch:].repeat(n, 1, 1)])
    else:
        ehs = ehs.repeat(n, 1, 1)
    return predict(u, t, ehs, scale)


def _repeat(v: Any, n: int, batch: int) -> Any:
    """Repeat batch-sized tensors (also inside dicts) ``n`` times along dim 0, point-major."""
    if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch:
        return v.repeat(n, *([1] * (v.ndim - 1)))
    if isinstance(v, dict):
        return {k: _repeat(x, n, batch) for k, x in v.items()}
    return v


def _rescale_cfg(noise_cfg: torch.Tensor, noise_text: torch.Tensor, rescale: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg`` on ``[n, B, ...]``: per sample std matching (Lin et al. 2024)."""
    dims = list(range(2, noise_cfg.ndim))
    std_text = noise_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return rescale * rescaled + (1 - rescale) * noise_cfg


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


__all__ = ["ParallelPipelineOutput", "parallel_sample", "supported_pipelines"]
