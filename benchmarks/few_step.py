"""Few-step sampling: accelerated DDIM / DDPM and DualFast vs diffusers' DDIM, DPM-Solver++ 2M/3M, UniPC, DEIS.

    python benchmarks/few_step.py                      # default run (oracle + digits at NFE 5, 10), ~10 min, 2 cores
    python benchmarks/few_step.py --skip-digits        # oracle only (~4 min)
    python benchmarks/few_step.py --digits-nfe 5,6,8,10,15,20,50 --digits-images 300   # the reported run (~1 h)

(a) Gaussian-mixture oracle (``fastdiff.testing.make_gaussian_mixture(dim=64, num_components=8)``: exact score,
SD scaled-linear betas, trailing spacing, clip_sample off). Every sampler starts from the same ``x_T`` and runs in
float32 like a pipeline; errors are rms over all coordinates of all samples against

* ``rms_vs_ddim1000``: diffusers' DDIM with 1000 steps (float64), the reference the issue names; it ends at
  timestep 0 (``set_alpha_to_one=False``), as DDIM, DEIS and the accelerated DDIM do;
* ``rms_vs_exact``: the exact probability-flow ODE solution (``oracle.solve_ode``) at the sampler's *own*
  endpoint (timestep 0, or ``sigma = 0`` for DPM-Solver++ / UniPC whose ``final_sigmas_type`` is "zero"). This is
  the fair column; the 1000-step reference has its own error (``reference.ddim1000_vs_exact``).

With sharp, well separated components, few-step error is dominated by a few samples that end in a different
component than the exact solution; ``switched`` counts them and ``rms_unswitched`` is the error of the rest.
Baselines run with their diffusers defaults and, as extra rows, with Karras sigmas (their best grid option here);
``accel_ddim_karras`` runs the accelerated DDIM on the very same Karras grid (custom timesteps).

(b) the embedded digits model (``fastdiff.models.load_embedded_pipeline``): FD-digits and class accuracy of
``--digits-images`` samples per cell, same initial noise and labels for every cell (``fastdiff.compare``).

Also recorded: measured order of convergence on a grid that refines everywhere, and the stochastic samplers
(DDPM vs accelerated DDPM) by sliced Wasserstein distance to fresh data. Dev experiments that chose
fastdiff's defaults used other mixtures and other seeds than the ones reported here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NFES = [5, 6, 8, 10, 15, 20, 50]
BASELINES = ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"]
OURS = ["accel_ddim", "accel_ddim_paper", "accel_ddim_exact_score", "accel_ddim_dualfast", "ddim_dualfast",
        "dpmpp_2m_dualfast"]
KARRAS = ["dpmpp_2m_karras", "unipc_karras", "deis_karras", "accel_ddim_karras"]
DIGITS_SAMPLERS = BASELINES + ["accel_ddim", "accel_ddim_dualfast", "dpmpp_2m_dualfast", "ddpm", "accel_ddpm"]


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
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": f"cpu: {cpu}",
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "argv": sys.argv[1:]}


# ------------------------------------------------------------------------------------------------ oracle
def make_scheduler(name: str, config: dict[str, Any]):
    """Registry samplers plus the Karras-grid rows of this benchmark."""
    import diffusers

    from fastdiff.samplers.registry import make_scheduler as registry_scheduler

    if name == "dpmpp_2m_karras":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, solver_order=2, use_karras_sigmas=True)
    if name == "unipc_karras":
        return diffusers.UniPCMultistepScheduler.from_config(config, use_karras_sigmas=True)
    if name == "deis_karras":
        return diffusers.DEISMultistepScheduler.from_config(config, use_karras_sigmas=True)
    if name == "accel_ddim_karras":
        return registry_scheduler("accel_ddim", config)
    if name == "accel_ddim_exact_score":
        from fastdiff import AcceleratedDDIMScheduler

        return AcceleratedDDIMScheduler.from_config(config, max_step_ratio=None)
    return registry_scheduler(name, config)


def karras_timesteps(config: dict[str, Any], n: int) -> list[int]:
    """The integer timesteps diffusers' DPM-Solver++ uses with ``use_karras_sigmas=True``."""
    import diffusers

    sched = diffusers.DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
    sched.set_timesteps(n)
    ts = sorted({int(t) for t in sched.timesteps.tolist()}, reverse=True)
    return ts


def endpoint(sched) -> str:
    """Where a scheduler's last step lands: ``"t0"`` (alphas_cumprod[0]) or ``"zero"`` (sigma = 0)."""
    cfg = sched.config
    if "final_sigmas_type" in cfg:
        return "zero" if cfg.final_sigmas_type == "zero" else "t0"
    if "set_alpha_to_one" in cfg and type(sched).__name__ != "DEISMultistepScheduler":
        return "zero" if cfg.set_alpha_to_one else "t0"
    return "t0"


def run_sampler(sched, model, x, n: int, timesteps: list[int] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    if timesteps is None:
        sched.set_timesteps(n)
    else:
        sched.set_timesteps(timesteps=timesteps)
    x = x * sched.init_noise_sigma
    kwargs = {"generator": generator} if generator is not None else {}
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
    return x


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()) ** 2).mean().sqrt().item()


def oracle_section(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture

    config = dict(SD_SCHEDULER_CONFIG)
    oracle = make_gaussian_mixture(dim=64, num_components=8)
    x_T = torch.randn(args.oracle_samples, 64, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    t0 = time.perf_counter()
    ref = run_sampler(diffusers.DDIMScheduler.from_config(config), oracle, x_T, 1000)
    exact = {"t0": oracle.solve_ode(x_T, 999, 0, steps=args.ode_steps),
             "zero": oracle.solve_ode(x_T, 999, None, steps=args.ode_steps)}
    print(f"[oracle] references in {time.perf_counter() - t0:.0f}s: ddim1000 vs exact rms "
          f"{rms(ref, exact['t0']):.5f}", flush=True)

    def component(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.double(), oracle.means).argmin(1)

    from fastdiff.samplers.registry import sampler_spec

    rows: dict[str, Any] = {}
    for name in args.samplers:
        row = {"rms_vs_ddim1000": [], "rms_vs_exact": [], "switched": [], "rms_unswitched": [], "endpoint": None,
               "description": _describe(name, sampler_spec)}
        for n in args.nfe:
            sched = make_scheduler(name, config)
            ts = karras_timesteps(config, n) if name == "accel_ddim_karras" else None
            x = run_sampler(sched, oracle, x_T.float(), n, ts).double()
            end = endpoint(sched)
            target = exact[end]
            switched = component(x) != component(target)
            row["endpoint"] = end
            row["rms_vs_ddim1000"].append(rms(x, ref))
            row["rms_vs_exact"].append(rms(x, target))
            row["switched"].append(int(switched.sum()))
            row["rms_unswitched"].append(rms(x[~switched], target[~switched]) if (~switched).any() else float("nan"))
        rows[name] = row
        print(f"[oracle] {name:22s} " + " ".join(f"{e:.4f}" for e in row["rms_vs_exact"]), flush=True)
    return {"setup": {"oracle": "make_gaussian_mixture(dim=64, num_components=8)", "scheduler_config": config,
                      "samples": args.oracle_samples, "seed": args.seed, "dtype": "float32 samplers, float64 refs",
                      "ode_steps": args.ode_steps},
            "nfe": list(args.nfe),
            "reference": {"ddim1000_vs_exact": rms(ref, exact["t0"]), "exact_t0_vs_zero": rms(exact["t0"], exact["zero"])},
            "samplers": rows}


def _describe(name: str, spec) -> str:
    extra = {"dpmpp_2m_karras": "DPM-Solver++ 2M, Karras sigmas (diffusers)",
             "unipc_karras": "UniPC, Karras sigmas (diffusers)", "deis_karras": "DEIS, Karras sigmas (diffusers)",
             "accel_ddim_karras": "accelerated DDIM on DPM-Solver++'s Karras grid (custom timesteps)",
             "accel_ddim_exact_score": "accelerated DDIM without the step-ratio limit (max_step_ratio=None): "
                                       "for exact scores only"}
    return extra.get(name) or spec(name).description


def order_section(args: argparse.Namespace) -> dict[str, Any]:
    """Measured order on fractional grids uniform in t from 999 to 100 (every step refines)."""
    from fastdiff.samplers.accelerated_ddim import accelerated_step_coefficients
    from fastdiff.testing import make_gaussian_mixture

    oracle = make_gaussian_mixture(dim=64, num_components=8)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    exact = oracle.solve_ode(x, 999, 100, steps=args.ode_steps)
    variants = {"ddim": None, "accel_ddim": {}, "accel_ddim_paper": {"interpolation": "alphas_cumprod"}}
    steps = [10, 20, 40, 80]
    out: dict[str, Any] = {"grid": "uniform in t, 999 -> 100 (fractional), exact ODE reference", "steps": steps}
    for name, kw in variants.items():
        errs = []
        for n in steps:
            grid = torch.linspace(999, 100, n + 1, dtype=torch.float64).tolist()
            c = accelerated_step_coefficients(oracle.schedule, grid[:-1], grid[-1], **(kw or {}))
            y, prev = x.clone(), None
            for i, t in enumerate(grid[:-1]):
                a, s = oracle.schedule.alpha(t).item(), oracle.schedule.sigma(t).item()
                eps = oracle(y, t)
                x0 = (y - s * eps) / a
                y_next = c.alpha_next[i] * x0 + c.sigma_next[i] * eps
                if kw is not None and prev is not None:
                    y_next = y_next + c.correction[i] * (eps - prev)
                y, prev = y_next, eps
            errs.append(rms(y, exact))
        orders = [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]
        out[name] = {"rms_vs_exact": errs, "order": orders}
        print(f"[order] {name:18s} errors {' '.join(f'{e:.2e}' for e in errs)} orders "
              f"{' '.join(f'{o:.2f}' for o in orders)}", flush=True)
    return out


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def stochastic_section(args: argparse.Namespace) -> dict[str, Any]:
    from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture

    config = dict(SD_SCHEDULER_CONFIG)
    oracle = make_gaussian_mixture(dim=64, num_components=8)
    n = args.oracle_samples
    x_T = torch.randn(n, 64, generator=torch.Generator().manual_seed(args.seed + 2), dtype=torch.float64)
    data = oracle.sample_data(n, generator=torch.Generator().manual_seed(args.seed + 3))
    floor = sliced_w2(oracle.sample_data(n, generator=torch.Generator().manual_seed(args.seed + 4)), data)
    out: dict[str, Any] = {"metric": "sliced W2 to fresh data samples (256 directions)", "data_vs_data": floor,
                           "nfe": list(args.nfe)}
    for name in ("ddpm", "accel_ddpm", "ddim", "accel_ddim"):
        vals = []
        for k in args.nfe:
            sched = make_scheduler(name, config)
            gen = torch.Generator().manual_seed(args.seed + 5)
            x = run_sampler(sched, oracle, x_T.float(), k, generator=gen if "ddpm" in name else None)
            vals.append(sliced_w2(x, data))
        out[name] = vals
        print(f"[stochastic] {name:12s} " + " ".join(f"{v:.4f}" for v in vals), flush=True)
    return out


# ------------------------------------------------------------------------------------------------ digits
def digits_section(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from fastdiff.compare import run_compare
        from fastdiff.models.digits import load_embedded_pipeline

        pipe = load_embedded_pipeline()
    except (ImportError, FileNotFoundError) as err:
        print(f"[digits] skipped: {err}", flush=True)
        return {"skipped": str(err)}
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    result, _ = run_compare(args.digits_samplers, args.digits_nfe, pipe=pipe, num_images=args.digits_images,
                            seed=args.seed, progress=False)
    table: dict[str, Any] = {}
    for cell in result.cells:
        row = table.setdefault(cell.sampler, {"fd": [], "accuracy": [], "nfe": [], "seconds": []})
        row["fd"].append(cell.fd)
        row["accuracy"].append(cell.accuracy)
        row["nfe"].append(cell.nfe)
        row["seconds"].append(cell.seconds)
    for name, row in table.items():
        print(f"[digits] {name:22s} FD " + " ".join(f"{v:.3f}" for v in row["fd"]), flush=True)
    return {"settings": result.settings, "metric": result.cells[0].metric if result.cells else None,
            "seconds": time.perf_counter() - t0, "samplers": table}


def digits_path_section(args: argparse.Namespace) -> dict[str, Any]:
    """ODE accuracy on the trained model: rms (pixels in [0, 1]) vs a 200-step DPM-Solver++ 2M solution from the
    same noise. FD rewards some solvers' bias; this column does not."""
    try:
        from fastdiff.models.digits import load_embedded_pipeline
        from fastdiff.samplers.registry import make_scheduler as registry_scheduler

        pipe = load_embedded_pipeline()
    except (ImportError, FileNotFoundError) as err:
        return {"skipped": str(err)}
    pipe.set_progress_bar_config(disable=True)
    n = args.path_images
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, pipe.transformer.config.sample_size, pipe.transformer.config.sample_size,
                        generator=torch.Generator().manual_seed(args.seed))
    config = pipe.scheduler.config

    def sample(name: str, steps: int) -> torch.Tensor:
        pipe.scheduler = registry_scheduler(name, config)
        return pipe(labels, num_inference_steps=steps, latents=noise.clone(), output_type="pt").images

    t0 = time.perf_counter()
    ref = sample("dpmpp_2m", 200)
    rows = {}
    for name in args.path_samplers:
        rows[name] = {"rms_vs_200step": [rms(sample(name, k), ref) for k in args.digits_nfe]}
        print(f"[digits-path] {name:22s} " + " ".join(f"{e:.4f}" for e in rows[name]["rms_vs_200step"]), flush=True)
    return {"settings": {"images": n, "seed": args.seed, "reference": "dpmpp_2m, 200 steps",
                         "guidance_scale": "pipeline default", "steps": list(args.digits_nfe)},
            "seconds": time.perf_counter() - t0, "samplers": rows}


# ------------------------------------------------------------------------------------------------ targets
def targets(result: dict[str, Any]) -> dict[str, Any]:
    """At NFE 5 and 10: accel_ddim vs the best diffusers scheduler (defaults), oracle and digits."""
    out: dict[str, Any] = {}
    checks = [("oracle_rms_vs_ddim1000", "oracle", "rms_vs_ddim1000"), ("oracle_rms_vs_exact", "oracle", "rms_vs_exact"),
              ("digits_fd", "digits", "fd"), ("digits_rms_vs_200step", "digits_path", "rms_vs_200step")]
    for label, section, key in checks:
        sec = result.get(section, {})
        rows = sec.get("samplers") if isinstance(sec, dict) else None
        if not rows or "accel_ddim" not in rows:
            continue
        nfes = sec["nfe"] if "nfe" in sec else sec["settings"]["steps"]
        for ours in ("accel_ddim", "accel_ddim_exact_score", "accel_ddim_dualfast", "dpmpp_2m_dualfast"):
            if ours not in rows:
                continue
            for k in (5, 10):
                if k not in nfes:
                    continue
                i = nfes.index(k)
                base = {b: rows[b][key][i] for b in BASELINES if b in rows}
                best = min(base, key=base.get)
                mine = rows[ours][key][i]
                out[f"{label}/{ours}/nfe{k}"] = {"ours": mine, "best_baseline": best, "best_value": base[best],
                                                 "met": mine < base[best], "ratio": mine / base[best]}
    return out


def markdown(result: dict[str, Any]) -> str:
    """The measured tables as markdown (written next to the JSON as ``few_step.md``)."""
    env = result["environment"]
    lines = [f"Measured {env['date']} on {env['device']}, torch {env['torch']}, diffusers {env['diffusers']}.", ""]

    def table(title: str, nfes: list[int], rows: dict[str, Any], key: str, fmt: str, extra: str = "") -> None:
        lines.extend([f"**{title}**{extra}", "", "| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                      "|---|" + "---:|" * len(nfes)])
        for name, row in rows.items():
            vals = [fmt.format(v) if v is not None else "-" for v in row[key]]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")

    oracle = result.get("oracle")
    if oracle:
        ref = oracle["reference"]
        table("Oracle: rms error vs 1000-step DDIM", oracle["nfe"], oracle["samplers"], "rms_vs_ddim1000", "{:.4f}",
              f" (the reference itself is {ref['ddim1000_vs_exact']:.4f} from the exact solution)")
        table("Oracle: rms error vs the exact ODE solution at the sampler's own endpoint", oracle["nfe"],
              oracle["samplers"], "rms_vs_exact", "{:.4f}")
        table("Oracle: samples ending in another mixture component than the exact solution "
              f"(of {oracle['setup']['samples']})", oracle["nfe"], oracle["samplers"], "switched", "{:d}")
    order = result.get("order")
    if order:
        lines.extend(["**Measured order** (" + order["grid"] + ")", "", "| sampler | " +
                      " | ".join(f"{a}->{b} steps" for a, b in zip(order["steps"][:-1], order["steps"][1:])) + " |",
                      "|---|" + "---:|" * (len(order["steps"]) - 1)])
        for name in ("ddim", "accel_ddim", "accel_ddim_paper"):
            lines.append(f"| {name} | " + " | ".join(f"{o:.2f}" for o in order[name]["order"]) + " |")
        lines.append("")
    digits = result.get("digits")
    if digits and "samplers" in digits:
        nfes = digits["settings"]["steps"]
        table(f"Embedded digits model: {digits['metric']} ({digits['settings']['num_images']} images, "
              f"guidance {digits['settings']['guidance_scale']})", nfes, digits["samplers"], "fd", "{:.2f}")
        table("Embedded digits model: class accuracy", nfes, digits["samplers"], "accuracy", "{:.3f}")
    path = result.get("digits_path")
    if path and "samplers" in path:
        table(f"Embedded digits model: rms vs a {path['settings']['reference']} solution from the same noise "
              f"({path['settings']['images']} images; ODE accuracy, pixels in [0, 1])", path["settings"]["steps"],
              path["samplers"], "rms_vs_200step", "{:.4f}")
    if result.get("targets"):
        lines.extend(["**Targets** (NFE 5 and 10, vs the best diffusers scheduler at its defaults)", "",
                      "| check | ours | best baseline | ratio | met |", "|---|---:|---|---:|---|"])
        for k, v in result["targets"].items():
            lines.append(f"| {k} | {v['ours']:.4f} | {v['best_baseline']} {v['best_value']:.4f} | {v['ratio']:.2f} | "
                         f"{'yes' if v['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("oracle", "rms_vs_exact", "oracle: rms vs exact ODE"), ("digits", "fd", "digits: FD-digits"),
              ("digits_path", "rms_vs_200step", "digits: rms vs 200-step solution")]
    panels = [p for p in panels if isinstance(result.get(p[0]), dict) and "samplers" in result[p[0]]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    for ax, (section, key, title) in zip(axes[0], panels):
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        sec = result[section]
        nfes = sec.get("nfe") or sec["settings"]["steps"]
        for name, row in sec["samplers"].items():
            if name.endswith("_karras") or name == "accel_ddim_exact_score":
                continue  # keep the plot readable; the table has every row
            style = "-" if name.startswith("accel") or "dualfast" in name else "--"
            ax.plot(nfes, row[key], style, marker="o", ms=3, label=name, lw=2.2 if name == "accel_ddim" else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(n) for n in nfes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("NFE")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"few-step sampling ({result['environment']['device']}, torch {result['environment']['torch']}, "
                 f"diffusers {result['environment']['diffusers']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=NFES)
    p.add_argument("--samplers", type=lambda s: s.split(","), default=BASELINES + OURS + KARRAS,
                   help="oracle samplers (registry names and the *_karras rows)")
    p.add_argument("--digits-samplers", type=lambda s: s.split(","), default=DIGITS_SAMPLERS)
    p.add_argument("--oracle-samples", type=int, default=1024)
    p.add_argument("--ode-steps", type=int, default=500, help="RK4 steps of the exact reference")
    p.add_argument("--digits-images", type=int, default=300)
    p.add_argument("--digits-nfe", type=lambda s: [int(v) for v in s.split(",")], default=[5, 10],
                   help="digits NFEs (default 5,10 to stay within ~10 min on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path-images", type=int, default=100, help="images of the digits ODE-accuracy section")
    p.add_argument("--path-samplers", type=lambda s: s.split(","),
                   default=["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "accel_ddim", "accel_ddim_paper"])
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--skip-oracle", action="store_true")
    p.add_argument("--skip-digits-fd", action="store_true", help="run only the digits ODE-accuracy part")
    p.add_argument("--render-only", action="store_true", help="re-render few_step.md / .png from the JSON")
    p.add_argument("--keep-previous", action="store_true",
                   help="keep the sections of an existing few_step.json that this run skips")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render_only:
        result = json.loads((args.out / "few_step.json").read_text())
        result["targets"] = targets(result)
        (args.out / "few_step.json").write_text(json.dumps(result, indent=1))
        plot(result, args.out / "few_step.png")
        (args.out / "few_step.md").write_text(markdown(result))
        return result
    start = time.perf_counter()
    result: dict[str, Any] = {"environment": environment()}
    if not args.skip_oracle:
        result["oracle"] = oracle_section(args)
        result["order"] = order_section(args)
        result["stochastic"] = stochastic_section(args)
    if not args.skip_digits:
        if not args.skip_digits_fd:
            result["digits"] = digits_section(args)
        result["digits_path"] = digits_path_section(args)
    previous = args.out / "few_step.json"
    if args.keep_previous and previous.is_file():
        old = json.loads(previous.read_text())
        kept = [k for k in ("oracle", "order", "stochastic", "digits", "digits_path") if k not in result and k in old]
        for k in kept:
            result[k] = old[k]
        if kept:
            result["environment"]["kept_from_previous_run"] = {"sections": kept, "environment": old["environment"]}
    result["targets"] = targets(result)
    result["environment"]["runtime_s"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "few_step.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "few_step.png")
    (args.out / "few_step.md").write_text(markdown(result))
    for k, v in result["targets"].items():
        print(f"[target] {k}: ours {v['ours']:.4f} vs {v['best_baseline']} {v['best_value']:.4f} "
              f"-> {'met' if v['met'] else 'NOT met'} (ratio {v['ratio']:.2f})")
    print(f"wrote {args.out / 'few_step.json'}, few_step.md and few_step.png in {result['environment']['runtime_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
