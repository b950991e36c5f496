"""Few-step samplers: fastdiff's accelerated DDIM and DualFast vs every diffusers multistep scheduler.

    python benchmarks/few_step.py --sections oracle,order,dualfast   # exact-score parts (~8 min, 1 core)
    python benchmarks/few_step.py --sections digits                  # FD-digits on the embedded model
    python benchmarks/few_step.py --render-only                      # re-render few_step.md from the JSON

Every run merges its sections into ``benchmarks/results/few_step.json`` (older sections stay, each with its
own date and settings) and re-renders ``few_step.md`` / ``few_step.png``.

**oracle**: three exact-score anisotropic Gaussian mixtures (``fastdiff.testing.make_anisotropic_mixture``,
seeds the dev experiments did not use), each with its own schedule, spacing and prediction type (table
``ORACLES``). Every sampler starts from the same ``x_T`` (pure noise at ``t = T - 1``) and runs in float32 like a
pipeline; its error is the rms over all coordinates against the exact probability-flow ODE solution
(``oracle.solve_ode``, float64) from ``x_T`` to the sampler's own endpoint (``alphas_cumprod[0]`` or ``sigma = 0``).
Measures: ``rms`` over all samples; ``rms_right`` over the samples the sampler sends to the exact solution's
mixture component; ``rms_common`` over the samples that *every* sampler of the table sends to the right component.
Baselines: every diffusers multistep scheduler with its spacing options (Karras sigmas) and final-sigma variants
(``BASELINES``); NFE counts real model calls. fastdiff rows: ``OURS`` (``accel_ddim_noise_start`` is the
default with the ``noise_space_steps=2`` option at 8-14 steps, ``NOISE_START_REGIMES``; ``accel_ddim_v5`` the
previous default, i.e. without ``final_interpolation`` and ``evaluate_at_zero``; ``accel_ddim_order3_low`` the default with
``LOW_STEP_ORDER3`` below 8 steps) and the DualFast pairs.

**order**: measured order of convergence of the accelerated update (the default's update, i.e. its
predictor-corrector, fastdiff v2's and the paper's) on fractional grids uniform in ``t`` from 999 to 100 (every
step refines), on a smooth single-Gaussian oracle and on the first mixture.

**dualfast**: on an exact score (no approximation error) the change DualFast makes vs the base solver's own error,
per NFE: the paper's form, fastdiff's earlier ``_prediction`` variant and its ``_interpolate`` option
(``INTERPOLATE_SETTINGS``; the digits section measures the same rows).

**digits**: FD-digits and class accuracy on the embedded digits model (``fastdiff.compare.run_compare``):
``--digits-images`` images per cell for each of ``--digits-seeds``, the same noise and labels for every sampler
within a seed, the pipeline's default guidance scale; FD of the pooled images, and DualFast's paired FD change vs
its base solver per seed (its spread is the noise of the comparison).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NFES = [5, 6, 8, 10, 15, 20]
SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
      "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 0}
ORACLES: dict[str, dict[str, Any]] = {
    "A: 48-d, 5 comp., scaled-linear, trailing, eps": dict(
        mixture=dict(dim=48, num_components=5, std_range=(0.02, 0.6), seed=101),
        config={**SD, "timestep_spacing": "trailing", "prediction_type": "epsilon"}),
    "B: 24-d, 3 comp., linear, linspace, v": dict(
        mixture=dict(dim=24, num_components=3, std_range=(0.05, 0.8), mean_scale=1.5, seed=202),
        config={**LINEAR, "timestep_spacing": "linspace", "prediction_type": "v_prediction"}),
    "C: 64-d, 6 comp., scaled-linear, leading, eps": dict(
        mixture=dict(dim=64, num_components=6, std_range=(0.03, 0.4), seed=303),
        config={**SD, "timestep_spacing": "leading", "prediction_type": "epsilon"}),
}
OURS = ["accel_ddim", "accel_ddim_v5", "accel_ddim_v3", "accel_ddim_v2", "accel_ddim_paper", "accel_ddim_noise_start",
        "accel_ddim_order3_low"]
DUALFAST_PAIRS = {"ddim": "ddim_dualfast", "dpmpp_2m": "dpmpp_2m_dualfast", "unipc": "unipc_dualfast",
                  "accel_ddim_v2": "accel_ddim_dualfast"}
#: fastdiff's "interpolate" DualFast option (fastdiff.samplers.dualfast), rows ``<dualfast name>_interpolate``
INTERPOLATE_SETTINGS = {"dualfast_variant": "interpolate", "dualfast_scale": 0.3}
DIGITS_SAMPLERS = ["ddim", "ddim_dualfast", "dpmpp_2m", "dpmpp_2m_dualfast", "unipc", "unipc_dualfast", "accel_ddim_v2",
                   "accel_ddim_dualfast", "accel_ddim", "accel_ddim_v3"]


def environment() -> dict[str, Any]:
    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": f"cpu: {cpu}", "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "argv": sys.argv[1:]}


# ------------------------------------------------------------------------------------------------ samplers
def _baselines() -> dict[str, Callable[[dict[str, Any]], Any]]:
    """Every diffusers multistep scheduler, with Karras sigmas and both final-sigma types where it has them."""
    import diffusers as d

    out: dict[str, Callable[[dict[str, Any]], Any]] = {
        "ddim": lambda c: d.DDIMScheduler.from_config(c),
        "pndm": lambda c: d.PNDMScheduler.from_config(c, skip_prk_steps=True),
        "lms": lambda c: d.LMSDiscreteScheduler.from_config(c),
        "lms_karras": lambda c: d.LMSDiscreteScheduler.from_config(c, use_karras_sigmas=True),
        "sa_solver": lambda c: d.SASolverScheduler.from_config(c, tau_func=lambda t: 0),  # deterministic
    }
    for karras in (False, True):
        k = "_karras" if karras else ""
        kw = {"use_karras_sigmas": True} if karras else {}
        out[f"deis{k}"] = lambda c, kw=kw: d.DEISMultistepScheduler.from_config(c, **kw)
        for final in ("zero", "sigma_min"):
            fk = {**kw, "final_sigmas_type": final}
            tag = f"{k}_{final}"
            out[f"dpmpp_2m{tag}"] = lambda c, fk=fk: d.DPMSolverMultistepScheduler.from_config(
                c, algorithm_type="dpmsolver++", solver_order=2, **fk)
            out[f"dpmpp_3m{tag}"] = lambda c, fk=fk: d.DPMSolverMultistepScheduler.from_config(
                c, algorithm_type="dpmsolver++", solver_order=3, **fk)
            for bh in ("bh1", "bh2"):
                out[f"unipc_{bh}{tag}"] = lambda c, fk=fk, bh=bh: d.UniPCMultistepScheduler.from_config(
                    c, solver_type=bh, **fk)
    return out


def make_scheduler(name: str, config: dict[str, Any]) -> Any:
    """Registry samplers, this benchmark's named variants, and the diffusers baselines."""
    from fastdiff.samplers.accelerated_ddim import (
        FEW_STEP_REGIMES,
        LOW_STEP_ORDER3,
        NOISE_START_REGIMES,
        AcceleratedDDIMScheduler,
        few_step_scheduler,
    )
    from fastdiff.samplers.registry import available_samplers
    from fastdiff.samplers.registry import make_scheduler as registry_scheduler

    if name == "accel_ddim_exact_score":
        return AcceleratedDDIMScheduler.from_config(config, max_step_ratio=None)
    if name == "accel_ddim_noise_start":  # the default with the noise_space_steps=2 option at 8-14 steps
        return few_step_scheduler(config, step_regimes=NOISE_START_REGIMES)
    if name == "accel_ddim_v5":  # the previous default: the default without final_interpolation / evaluate_at_zero
        return few_step_scheduler(config, step_regimes=[[k, {key: v for key, v in settings.items()
                                                             if key not in ("final_interpolation", "evaluate_at_zero")}]
                                                        for k, settings in FEW_STEP_REGIMES])
    if name == "accel_ddim_order3_low":  # the default with LOW_STEP_ORDER3 below 8 steps (the dev mixtures' choice)
        return few_step_scheduler(config, step_regimes=[[1, LOW_STEP_ORDER3], *FEW_STEP_REGIMES[1:]])
    if name == "accel_ddim_data":
        return AcceleratedDDIMScheduler.from_config(config, solver_space="data", interpolation="log_snr")
    if name.endswith("_prediction") and name[: -len("_prediction")] in available_samplers():
        sched = registry_scheduler(name[: -len("_prediction")], config)
        return type(sched).from_config(sched.config, dualfast_variant="prediction")
    if name.endswith("_interpolate") and name[: -len("_interpolate")] in available_samplers():
        sched = registry_scheduler(name[: -len("_interpolate")], config)
        return type(sched).from_config(sched.config, **INTERPOLATE_SETTINGS)
    if name.startswith("dualfast_scale"):  # dualfast_scale<scale>:<sampler>
        scale, base = name[len("dualfast_scale"):].split(":")
        sched = registry_scheduler(base, config)
        return type(sched).from_config(sched.config, dualfast_scale=float(scale))
    if name in available_samplers():
        return registry_scheduler(name, config)
    return _baselines()[name](config)


def endpoint(sched: Any) -> str:
    """Where a scheduler's last step lands (after ``set_timesteps``): ``"t0"`` (alphas_cumprod[0]) or ``"zero"``
    (sigma = 0): from the final entry of its ``sigmas``, else from ``set_alpha_to_one``."""
    sigmas = getattr(sched, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 1:
        return "zero" if float(sigmas[-1]) == 0.0 else "t0"
    return "zero" if sched.config.get("set_alpha_to_one", False) else "t0"


def run_sampler(sched: Any, model: Any, x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    sched.set_timesteps(n)
    x = x * sched.init_noise_sigma
    calls = 0
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
        calls += 1
    return x, calls


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()) ** 2).mean().sqrt().item() if a.numel() else float("nan")


# ------------------------------------------------------------------------------------------------ oracle
def oracle_section(args: argparse.Namespace) -> dict[str, Any]:
    from fastdiff.testing import make_anisotropic_mixture

    names = list(_baselines()) + OURS + list(DUALFAST_PAIRS.values())
    out: dict[str, Any] = {"nfe": list(args.nfe), "samples": args.oracle_samples, "oracles": {}}
    for label, spec in ORACLES.items():
        if args.oracles and label.split(":")[0] not in args.oracles:
            continue
        t0 = time.perf_counter()
        config = spec["config"]
        oracle = make_anisotropic_mixture(scheduler_config=config, prediction_type=config["prediction_type"],
                                          **spec["mixture"])
        dim = spec["mixture"]["dim"]
        x_T = torch.randn(args.oracle_samples, dim, generator=torch.Generator().manual_seed(args.seed),
                          dtype=torch.float64)
        top = config["num_train_timesteps"] - 1
        exact = {"t0": oracle.solve_ode(x_T, top, 0, steps=args.ode_steps),
                 "zero": oracle.solve_ode(x_T, top, None, steps=args.ode_steps)}
        check = oracle.solve_ode(x_T[:64], top, 0, steps=args.ode_steps // 2)

        def component(x: torch.Tensor, means: torch.Tensor = oracle.means) -> torch.Tensor:
            return torch.cdist(x.double(), means).argmin(1)

        right_comp = {k: component(v) for k, v in exact.items()}
        rows: dict[str, Any] = {}
        finals: dict[str, list[tuple[torch.Tensor, str]]] = {}
        for name in names:
            row = {"rms": [], "rms_right": [], "wrong": [], "endpoint": None, "nfe_calls": []}
            finals[name] = []
            for n in args.nfe:
                sched = make_scheduler(name, config)
                x, calls = run_sampler(sched, oracle, x_T.float(), n)
                end = endpoint(sched)
                ok = component(x) == right_comp[end]
                row["endpoint"] = end
                row["nfe_calls"].append(calls)
                valid = calls == n
                row["rms"].append(rms(x, exact[end]) if valid else float("nan"))
                row["rms_right"].append(rms(x[ok], exact[end][ok]) if valid else float("nan"))
                row["wrong"].append(int((~ok).sum()))
                finals[name].append((x.double(), end, ok))
            rows[name] = row
        for j in range(len(args.nfe)):  # samples every sampler sends to the right component
            common = torch.stack([finals[nm][j][2] for nm in names]).all(0)
            for nm in names:
                x, end, _ = finals[nm][j]
                rows[nm].setdefault("rms_common", []).append(rms(x[common], exact[end][common]))
                rows[nm].setdefault("common_samples", []).append(int(common.sum()))
        out["oracles"][label] = {"config": config, "mixture": spec["mixture"], "samplers": rows,
                                 "exact_check_rms": rms(check, exact["t0"][:64]),
                                 "seconds": time.perf_counter() - t0}
        best = _best_baseline(rows, "rms", len(args.nfe))
        print(f"[oracle {label}] {time.perf_counter() - t0:.0f}s; accel_ddim / best diffusers: " + " ".join(
            f"{rows['accel_ddim']['rms'][j] / best[j][1]:.2f}" for j in range(len(args.nfe))), flush=True)
    return out


def _best_baseline(rows: dict[str, Any], key: str, n: int) -> list[tuple[str, float]]:
    base = [b for b in _baselines() if b in rows]
    out = []
    for j in range(n):
        vals = {b: rows[b][key][j] for b in base if rows[b][key][j] == rows[b][key][j]}
        name = min(vals, key=vals.get)
        out.append((name, vals[name]))
    return out


# ------------------------------------------------------------------------------------------------ order
def order_section(args: argparse.Namespace) -> dict[str, Any]:
    """Measured order on fractional grids uniform in t from 999 to 100 (every step refines)."""
    from fastdiff.samplers.accelerated_ddim import accelerated_step_coefficients, few_step_update_settings
    from fastdiff.testing import AnisotropicGaussianMixtureDenoiser, make_anisotropic_mixture

    smooth_src = make_anisotropic_mixture(dim=16, num_components=1, std_range=(0.3, 1.0), seed=404,
                                          scheduler_config={**SD, "timestep_spacing": "trailing"})
    smooth = AnisotropicGaussianMixtureDenoiser(smooth_src.means, smooth_src.rotations, smooth_src.variances,
                                                torch.ones(1), smooth_src.schedule)
    mixture = make_anisotropic_mixture(scheduler_config=ORACLES[next(iter(ORACLES))]["config"],
                                       **next(iter(ORACLES.values()))["mixture"])
    variants = {"ddim": {"solver_order": 1}, "accel_ddim": few_step_update_settings(20),
                "accel_ddim (8-14 steps)": few_step_update_settings(10),
                "accel_ddim (1-7 steps)": few_step_update_settings(5), "accel_ddim_v2": {},
                "accel_ddim_paper": {"interpolation": "alphas_cumprod", "max_step_ratio": None}}
    steps = [10, 20, 40, 80]
    out: dict[str, Any] = {"grid": "uniform in t, 999 -> 100 (fractional), exact ODE reference", "steps": steps}
    for oname, oracle in (("smooth (one anisotropic Gaussian, 16-d)", smooth), ("mixture A", mixture)):
        x = torch.randn(128, oracle.dim, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
        exact = oracle.solve_ode(x, 999, 100, steps=args.ode_steps)
        res: dict[str, Any] = {}
        for name, kw in variants.items():
            errs = []
            for n in steps:
                grid = torch.linspace(999, 100, n + 1, dtype=torch.float64).tolist()
                b, c = accelerated_step_coefficients(oracle.schedule, grid[:-1], grid[-1], **kw).linear_form()
                y, x0s, epss = x.clone(), [], []
                for i, t in enumerate(grid[:-1]):  # x_{i+1} = sum_j b[i, j] x0_{i-j} + c[i, j] eps_{i-j}
                    a, s = oracle.schedule.alpha(t).item(), oracle.schedule.sigma(t).item()
                    eps = oracle(y, t)
                    x0s.insert(0, (y - s * eps) / a)
                    epss.insert(0, eps)
                    y = sum(b[i, j] * x0s[j] + c[i, j] * epss[j] for j in range(min(len(x0s), b.shape[1])))
                errs.append(rms(y, exact))
            res[name] = {"rms": errs, "order": [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]}
            print(f"[order {oname}] {name:18s} " + " ".join(f"{o:.2f}" for o in res[name]["order"]), flush=True)
        out[oname] = res
    return out


# ------------------------------------------------------------------------------------------------ dualfast
def dualfast_section(args: argparse.Namespace) -> dict[str, Any]:
    """Exact score: |error(base + DualFast) - error(base)| vs error(base), the paper form and both variants."""
    from fastdiff.testing import make_anisotropic_mixture

    label = next(iter(ORACLES))
    spec = ORACLES[label]
    oracle = make_anisotropic_mixture(scheduler_config=spec["config"], **spec["mixture"])
    x_T = torch.randn(256, spec["mixture"]["dim"], generator=torch.Generator().manual_seed(args.seed + 2),
                      dtype=torch.float64)
    exact = {"t0": oracle.solve_ode(x_T, 999, 0, steps=args.ode_steps),
             "zero": oracle.solve_ode(x_T, 999, None, steps=args.ode_steps)}
    nfes = list(args.nfe) + [40]
    rows: dict[str, Any] = {}
    for base, df in DUALFAST_PAIRS.items():
        for name in (base, df, df + "_prediction", df + "_interpolate"):
            errs = []
            for n in nfes:
                sched = make_scheduler(name, spec["config"])
                x, _ = run_sampler(sched, oracle, x_T.float(), n)
                errs.append(rms(x, exact[endpoint(sched)]))
            rows[name] = errs
        print(f"[dualfast] {base:10s} base " + " ".join(f"{e:.4f}" for e in rows[base]) + " | paper " +
              " ".join(f"{e:.4f}" for e in rows[df]), flush=True)
    return {"oracle": label, "nfe": nfes, "samples": 256, "rms": rows}


# ------------------------------------------------------------------------------------------------ digits
def digits_section(args: argparse.Namespace) -> dict[str, Any]:
    """FD-digits per cell on ``--digits-images`` images for each of ``--digits-seeds`` (paired: every sampler gets
    the same noise and labels within a seed). ``fd`` is the FD of all seeds' images pooled; ``fd_seeds`` the
    per-seed values; ``paired`` holds, for each DualFast variant, the per-seed FD change vs its base solver (same
    noise), whose spread across seeds is the noise of the comparison."""
    from fastdiff.compare import _fd_to, run_compare
    from fastdiff.metrics import evaluate_samples
    from fastdiff.models.digits import DEFAULT_GUIDANCE_SCALE, load_embedded_pipeline
    from fastdiff.samplers import registry

    pipe = load_embedded_pipeline()
    # this benchmark's variant names, for run_compare (which builds schedulers by registry name)
    for name in args.digits_samplers:
        if name not in registry.available_samplers():
            registry.register_sampler(name, lambda cfg, name=name: make_scheduler(name, dict(cfg)), name)
    t0 = time.perf_counter()
    pooled: dict[tuple[str, int], list[torch.Tensor]] = {}
    per_seed: dict[str, dict[str, list[list[float]]]] = {}
    settings: dict[str, Any] = {}
    reference: dict[str, Any] = {}
    for seed in args.digits_seeds:
        result, images = run_compare(args.digits_samplers, args.digits_nfe, pipe=pipe, num_images=args.digits_images,
                                     seed=seed, progress=False,
                                     reference=(args.digits_reference, args.digits_reference_steps))
        settings, reference = result.settings, result.reference
        for key, imgs in images.items():
            pooled.setdefault(key, []).append(imgs)
        for cell in result.cells:
            row = per_seed.setdefault(cell.sampler, {"fd": [[] for _ in args.digits_nfe],
                                                     "rms_to_ref": [[] for _ in args.digits_nfe],
                                                     "fd_to_ref": [[] for _ in args.digits_nfe]})
            j = args.digits_nfe.index(cell.steps)
            row["fd"][j].append(cell.fd)
            row["rms_to_ref"][j].append(cell.rms_to_ref)
            row["fd_to_ref"][j].append(cell.fd_to_ref)
        print(f"[digits] seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    labels = torch.cat([torch.arange(args.digits_images) % 10 for _ in args.digits_seeds])
    ref_all = torch.cat(pooled[("reference", args.digits_reference_steps)])
    table: dict[str, Any] = {}
    for name, row in per_seed.items():
        out = table.setdefault(name, {"fd": [], "accuracy": [], "fd_to_ref": [], "rms_to_ref": [], "fd_seeds": row["fd"],
                                      "fd_to_ref_seeds": row["fd_to_ref"]})
        for j, n in enumerate(args.digits_nfe):
            imgs = torch.cat(pooled[(name, n)])
            m = evaluate_samples(imgs, labels, value_range=(0, 1), metric="digits")
            out["fd"].append(m.fd)
            out["accuracy"].append(m.accuracy)
            out["fd_to_ref"].append(_fd_to(imgs, ref_all))
            out["rms_to_ref"].append(sum(row["rms_to_ref"][j]) / len(row["rms_to_ref"][j]))
        print(f"[digits] {name:30s} FD " + " ".join(f"{v:.3f}" for v in out["fd"]) + "  FD to conv. " +
              " ".join(f"{v:.3f}" for v in out["fd_to_ref"]), flush=True)
    paired: dict[str, Any] = {}
    for base, name in DUALFAST_PAIRS.items():
        for variant in (name, name + "_prediction", name + "_interpolate"):
            if variant in per_seed and base in per_seed:
                diffs = [[a - b for a, b in zip(per_seed[variant]["fd"][j], per_seed[base]["fd"][j])]
                         for j in range(len(args.digits_nfe))]
                paired[variant] = {"base": base, "fd_change_seeds": diffs,
                                   "fd_change_mean": [sum(d) / len(d) for d in diffs],
                                   "fd_change_sem": [_sem(d) for d in diffs],
                                   "fd_change_pooled": [table[variant]["fd"][j] - table[base]["fd"][j]
                                                        for j in range(len(args.digits_nfe))]}
    model_cfg = json.loads((ROOT / "fastdiff/models/digits_pixart/transformer/config.json").read_text())
    ref_m = evaluate_samples(ref_all, labels, value_range=(0, 1), metric="digits")
    return {"settings": {**settings, "seed": None, "seeds": list(args.digits_seeds),
                         "images_per_seed": args.digits_images, "num_images": args.digits_images * len(args.digits_seeds),
                         "default_guidance_scale": DEFAULT_GUIDANCE_SCALE,
                         "transformer_patch_size": model_cfg.get("patch_size")},
            "reference": {**reference, "fd": ref_m.fd, "accuracy": ref_m.accuracy, "pooled_images": len(ref_all)},
            "steps": list(args.digits_nfe), "seconds": time.perf_counter() - t0, "samplers": table, "paired": paired}


def _sem(values: list[float]) -> float:
    """Standard error of the mean (nan for fewer than two values)."""
    k = len(values)
    if k < 2:
        return float("nan")
    mean = sum(values) / k
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1) / k)


# ------------------------------------------------------------------------------------------------ targets
def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with its measured value and whether it was met."""
    out: dict[str, Any] = {}
    sec = result.get("oracle")
    if sec:
        nfes = sec["nfe"]
        for label, o in sec["oracles"].items():
            rows = o["samplers"]
            for key in ("rms", "rms_right", "rms_common"):
                best = _best_baseline(rows, key, len(nfes))
                for j, n in enumerate(nfes):
                    mine = rows["accel_ddim"][key][j]
                    out[f"oracle {label} / {key} / NFE {n}"] = {
                        "accel_ddim": mine, "best_diffusers": best[j][0], "best_value": best[j][1],
                        "ratio": mine / best[j][1], "met": mine < best[j][1]}
    order = result.get("order")
    if order:
        for oname, res in order.items():
            if isinstance(res, dict) and "accel_ddim" in res:  # the updates the default uses at 10-80 steps
                worst = min(min(res[k]["order"]) for k in ("accel_ddim", "accel_ddim (8-14 steps)") if k in res)
                out[f"order >= 1.9 (10-80 steps), {oname}"] = {"min_order": worst, "met": worst >= 1.9}
    df = result.get("dualfast")
    if df:
        for base, name in DUALFAST_PAIRS.items():
            for j, n in enumerate(df["nfe"]):
                change, own = abs(df["rms"][name][j] - df["rms"][base][j]), df["rms"][base][j]
                out[f"dualfast exact-score change < base error / {name} / NFE {n}"] = {
                    "change": change, "base_error": own, "met": change < own}
    dg = result.get("digits")
    if dg and "paired" in dg:
        for variant, pr in dg["paired"].items():
            if variant not in DUALFAST_PAIRS.values():  # the target is the paper's form; options are tabled only
                continue
            for j, n in enumerate(dg["steps"]):
                mean, sem = pr["fd_change_mean"][j], pr["fd_change_sem"][j]
                out[f"digits FD lowered / {variant} vs {pr['base']} / NFE {n}"] = {
                    "fd_change": mean, "sem": sem, "fd_change_pooled": pr["fd_change_pooled"][j],
                    "resolved": abs(mean) > 2 * sem, "met": mean < 0 and pr["fd_change_pooled"][j] < 0}
    return out


# ------------------------------------------------------------------------------------------------ output
def markdown(result: dict[str, Any]) -> str:
    lines = ["# Few-step samplers (benchmarks/few_step.py)", ""]
    sec = result.get("oracle")
    if sec:
        env = sec["environment"]
        lines += [f"Oracle sections measured {env['date']} on {env['device']} ({env['torch_threads']} threads), "
                  f"torch {env['torch']}, diffusers {env['diffusers']}; {sec['samples']} samples per oracle.", ""]
        nfes = sec["nfe"]
        for label, o in sec["oracles"].items():
            rows = o["samplers"]
            for key, title in (("rms", "rms vs the exact ODE solution, all samples"),
                               ("rms_right", "rms over the samples ending in the right component"),
                               ("rms_common", "rms over the samples every sampler sends to the right component")):
                best = _best_baseline(rows, key, len(nfes))
                lines += [f"**Oracle {label}: {title}** (bold: lowest of the row set; last line: best diffusers)", "",
                          "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                          "|---|" + "---:|" * len(nfes)]
                order = sorted(rows, key=lambda nm: (nm not in OURS and nm not in DUALFAST_PAIRS.values(), nm))
                col_min = [min(rows[nm][key][j] for nm in rows if rows[nm][key][j] == rows[nm][key][j])
                           for j in range(len(nfes))]
                for nm in order:
                    cells = []
                    for j in range(len(nfes)):
                        v = rows[nm][key][j]
                        s = "n/a" if v != v else f"{v:.4f}"
                        cells.append(f"**{s}**" if v == col_min[j] else s)
                    lines.append(f"| {nm} | " + " | ".join(cells) + " |")
                lines.append("| *best diffusers* | " + " | ".join(f"{b[1]:.4f} ({b[0]})" for b in best) + " |")
                lines.append("")
            lines += [f"Samples ending in the wrong component (accel_ddim): {rows['accel_ddim']['wrong']}; common set "
                      f"sizes: {rows['accel_ddim']['common_samples']}; exact reference self-check rms "
                      f"{o['exact_check_rms']:.1e}.", ""]
    order = result.get("order")
    if order:
        lines += [f"**Measured order** ({order['grid']}; steps {order['steps']})", "",
                  "| oracle | sampler | rms at 10/20/40/80 steps | order |", "|---|---|---|---|"]
        for oname, res in order.items():
            if isinstance(res, dict) and "ddim" in res:
                for nm, r in res.items():
                    lines.append(f"| {oname} | {nm} | {' / '.join(f'{e:.2e}' for e in r['rms'])} | "
                                 f"{' / '.join(f'{o:.2f}' for o in r['order'])} |")
        lines.append("")
    df = result.get("dualfast")
    if df:
        lines += [f"**DualFast on an exact score** (oracle {df['oracle']}, {df['samples']} samples): rms vs the exact "
                  "ODE solution", "", "| sampler | " + " | ".join(f"NFE {n}" for n in df["nfe"]) + " |",
                  "|---|" + "---:|" * len(df["nfe"])]
        for nm, errs in df["rms"].items():
            lines.append(f"| {nm} | " + " | ".join(f"{e:.4f}" for e in errs) + " |")
        lines.append("")
    dg = result.get("digits")
    if dg and "samplers" in dg and "seeds" in dg["settings"]:
        env = dg.get("environment", {})
        st = dg["settings"]
        ref = dg["reference"]
        lines += [f"**Embedded digits model** ({env.get('date')}, {env.get('device')}): FD-digits to the data / class "
                  f"accuracy / FD to the converged samples ({ref['sampler']} x {ref['steps']}, FD-digits "
                  f"{ref['fd']:.3f}), {st['images_per_seed']} images per seed and cell, seeds {st['seeds']} (paired: "
                  f"same noise and labels for every sampler within a seed), FD of the {st['num_images']} images pooled; "
                  f"guidance {st['guidance_scale']}, transformer patch size {st.get('transformer_patch_size')}", "",
                  "| sampler | " + " | ".join(f"steps {n}" for n in dg["steps"]) + " |",
                  "|---|" + "---:|" * len(dg["steps"])]
        for nm, row in dg["samplers"].items():
            lines.append(f"| {nm} | " + " | ".join(f"{f:.3f} / {a:.3f} / {r:.3f}" for f, a, r in zip(
                row["fd"], row["accuracy"], row["fd_to_ref"])) + " |")
        lines.append("")
        if dg.get("paired"):
            lines += ["**DualFast on the digits model**: FD-digits change vs its base solver (negative: DualFast "
                      "better), per seed (paired noise), mean +- standard error over seeds, and on the pooled images",
                      "", "| variant (base) | " + " | ".join(f"steps {n}" for n in dg["steps"]) + " |",
                      "|---|" + "---:|" * len(dg["steps"])]
            for nm, pr in dg["paired"].items():
                cells = [f"{' '.join(f'{d:+.3f}' for d in pr['fd_change_seeds'][j])}; mean "
                         f"{pr['fd_change_mean'][j]:+.3f} +- {pr['fd_change_sem'][j]:.3f}; pooled "
                         f"{pr['fd_change_pooled'][j]:+.3f}" for j in range(len(dg["steps"]))]
                lines.append(f"| {nm} ({pr['base']}) | " + " | ".join(cells) + " |")
            lines.append("")
    tg = result.get("targets", {})
    if tg:
        missed = [k for k, v in tg.items() if not v["met"]]
        lines += [f"**Targets**: {len(tg) - len(missed)} of {len(tg)} met. Missed:", ""]
        for k in missed:
            v = tg[k]
            detail = (f"ratio {v['ratio']:.2f} ({v['best_diffusers']})" if "ratio" in v else
                      f"min order {v['min_order']:.2f}" if "min_order" in v else
                      f"change {v['change']:.4f} vs base {v['base_error']:.4f}" if "change" in v else
                      f"FD change {v['fd_change']:+.3f} +- {v['sem']:.3f} (pooled {v['fd_change_pooled']:+.3f}; "
                      f"{'resolved' if v['resolved'] else 'within 2 standard errors'})")
            lines.append(f"- {k}: {detail}")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    sec = result.get("oracle")
    if not sec:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(sec["oracles"])
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    axes = axes[0]
    for ax, label in zip(axes, labels):
        rows = sec["oracles"][label]["samplers"]
        best = _best_baseline(rows, "rms", len(sec["nfe"]))
        ax.plot(sec["nfe"], [b[1] for b in best], "k--", label="best diffusers (per NFE)")
        for nm in ("accel_ddim", "accel_ddim_v2", "accel_ddim_paper", "unipc_bh2_karras_sigma_min", "ddim"):
            if nm in rows:
                ax.plot(sec["nfe"], rows[nm]["rms"], marker="o", label=nm)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("NFE")
    axes[0].set_ylabel("rms vs exact ODE solution")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SECTIONS = {"oracle": oracle_section, "order": order_section, "dualfast": dualfast_section, "digits": digits_section}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", type=lambda s: s.split(","), default=["oracle", "order", "dualfast"])
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=NFES)
    p.add_argument("--oracle-samples", type=int, default=512)
    p.add_argument("--ode-steps", type=int, default=600, help="RK4 steps of the exact reference")
    p.add_argument("--digits-images", type=int, default=256, help="images per seed and cell")
    p.add_argument("--digits-seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--digits-nfe", type=lambda s: [int(v) for v in s.split(",")], default=[5, 10])
    p.add_argument("--digits-samplers", type=lambda s: s.split(","), default=DIGITS_SAMPLERS)
    p.add_argument("--digits-reference", default="dpmpp_2m", help="sampler of the converged reference (rms column)")
    p.add_argument("--digits-reference-steps", type=int, default=25)
    p.add_argument("--oracles", type=lambda s: s.split(","), default=None,
                   help="run only these oracles (letters, e.g. A,C); the others keep their stored results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.out / "few_step.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if result.get("format") != 2:
        result = {"format": 2}
    if not args.render_only:
        for name in args.sections:
            if name not in SECTIONS:
                raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
            t0 = time.perf_counter()
            new = SECTIONS[name](args)
            new["environment"] = {**environment(), "runtime_s": time.perf_counter() - t0}
            old = result.get(name)
            if name == "oracle" and args.oracles and old and (old["nfe"], old["samples"]) == (new["nfe"],
                                                                                               new["samples"]):
                for o in new["oracles"].values():
                    o["environment"] = new["environment"]
                old["oracles"].update(new["oracles"])
                new = {**old, "oracles": {k: old["oracles"][k] for k in ORACLES if k in old["oracles"]},
                       "environment": new["environment"]}
            key = ("steps", "images_per_seed", "seeds", "guidance_scale")
            if name == "digits" and old and "samplers" in old and [old["steps"]] + [
                    old["settings"].get(k) for k in key[1:]] == [new["steps"]] + [new["settings"].get(k) for k in key[1:]]:
                # same noise, labels and guidance: merge (other tables of the old section stay)
                new = {**old, **new, "samplers": {**old["samplers"], **new["samplers"]},
                       "paired": {**old.get("paired", {}), **new["paired"]}}
            result[name] = new
        # other runs may have written sections meanwhile: merge this run's sections into the file as it is now
        latest = json.loads(path.read_text()) if path.exists() else {}
        if latest.get("format") == 2:
            result = {**latest, **{name: result[name] for name in args.sections}}
        result["targets"] = targets(result)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    (args.out / "few_step.md").write_text(markdown(result))
    plot(result, args.out / "few_step.png")
    print(f"wrote {path}, few_step.md and few_step.png")
    return result


if __name__ == "__main__":
    main()
