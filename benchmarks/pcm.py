"""Picard Consistency Model (So et al. 2025): rounds to rms <= 1e-3 / 1e-2 of sequential sampling, FD-digits
and CPU wall clock, against sequential sampling, ParaDiGMS and fastdiff's Picard and Newton.

Claims under test (issue 14): with the shipped PCM (``fastdiff/models/digits_pcm``) the rounds at rms <= 1e-3
of sequential sampling are at most 0.5x ParaDiGMS's on the embedded digits model (DDIM-25/50/100) and at least
1.77x fewer than Picard's (the paper's figure), with exact convergence kept.

Side by side in one process, on the embedded digits model at its default guidance 1.0 (what the PCM was trained
for), with initial latents from seeds the PCM cache never used (``--seed``, default 2026; training used 1234):

* ``sequential``: ``scheduler.step`` sampling (``K`` rounds);
* ``paradigms``: diffusers' ParaDiGMS loop (``benchmarks/parallel_sampling.py``'s faithful reproduction),
  measured against its own sequential fixed point;
* ``picard`` / ``newton``: :func:`fastdiff.samplers.parallel.sample_parallel`;
* ``pcm+picard`` / ``pcm+newton``: the same with the PCM's model switching (its checkpoint's default
  schedule; ``--switch-rounds`` / ``--schedule`` / ``--space`` override it);
* ``pcm[linear2]+...``: the paper's linear ``lambda(r)`` (eq. 4 of ``fastdiff.samplers.pcm``) over 2 rounds, when
  that is not the checkpoint's default (``--variants`` names others, e.g. ``step1,linear3``);
* ``pcmr<S>+picard`` / ``pcmr<S>+newton`` (with ``--residual DIR``): [fastdiff] the iterate-residual PCM
  (``fastdiff.samplers.pcm.residual``): the paper PCM's round, then ``S`` switching rounds of the base plus the
  residual corrector (``--residual-rounds``, e.g. ``1,2,3``), then the base model;
* ``pcma<S>+...`` (``--residual-accept-rounds``): the same corrector in the solver's first ``S`` rounds after the
  PCM round instead (mode ``accept``: points are accepted in those rounds as usual).

Also the one-round accuracy: the rms distance to the fixed point ``X*`` (whole trajectory, and its final
point) after one Picard update with the base model and with the PCM, from the engine's initial iterate ``X^0``
(``one_round``); with ``--residual``, ``later_rounds``: the rms to ``X*`` after the PCM round and each of 3 further
rounds of the PCM again, the base model, or the base plus the residual corrector. DDPM-1000 (no PCM is trained on a stochastic grid) runs with ``--ddpm``.

Each method runs down a ladder of tolerances (largest first, until rms <= 1e-3); its result per target is
the fewest rounds within it. Rounds
count the pipeline's first model call too (the solver's warm start), as ``fastdiff.parallel_sample`` does.
FD-digits (``fastdiff.metrics``) of ``--fd-samples`` DDIM-25 samples per method, each method at the tolerance
that met 1e-3 on the batch-8 case. Wall clock: seconds of the run that met 1e-3 (CPU, ``--threads``).

    python benchmarks/pcm.py            # ~15 min on 2 busy CPU cores (--full: batch 8 on every grid, ~40 min)
    python benchmarks/pcm.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).parent))
from parallel_sampling import _rms, paradigms_loop, trajectory  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.metrics import evaluate_samples  # noqa: E402
from fastdiff.samplers.parallel import sample_parallel  # noqa: E402
from fastdiff.samplers.pcm import (  # noqa: E402
    EMBEDDED_PCM_DIR,
    ModelSwitch,
    PicardConsistencyModel,
    digits_denoiser,
    picard_trajectories,
    picard_update,
    switch_lambdas,
)
from fastdiff.samplers.steps import model_input, step_map_for  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = (1e-3, 1e-2)
LADDERS = {
    "paradigms": (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001),
    "picard": (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001),
    "newton": (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5),
}
LADDERS_DDPM = {"paradigms": (3.0, 1.0, 0.3, 0.1, 0.03), "picard": (3.0, 1.0, 0.3, 0.1, 0.03),
                "newton": (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5)}
METHODS = ("paradigms", "picard", "newton", "pcm+picard", "pcm+newton")
PAPER_VARIANT = "linear2"  # the paper's lambda(r) = max(0, 1 - r / 2)
GUIDANCE = 1.0


def _ladder(method: str, kind: str) -> tuple[float, ...]:
    """Tolerances tried, largest first, until one meets rms 1e-3 (DDPM-1000 has its own range)."""
    return (LADDERS_DDPM if kind == "ddpm" else LADDERS)[method.split("+")[-1]]


@torch.no_grad()
def run_method(method: str, tol: float, sm, model, switches: dict, config: dict, kind: str, steps: int, window: int,
               x: torch.Tensor, noise, seed: int) -> tuple[torch.Tensor, dict]:
    start = time.perf_counter()
    if method == "paradigms":
        y, rounds, evals = paradigms_loop(kind, config, steps, model, x, torch.Generator().manual_seed(seed), window, tol)
        info = {"rounds": rounds, "evals": evals}
    else:
        base = method.split("+")[-1]
        k0 = torch.zeros(1, dtype=torch.long)
        first = model(model_input(sm, k0, x[None])[0], sm.timesteps[:1].expand(len(x)))  # the pipeline's own call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            y, st = sample_parallel(sm, model, x, noise, method=base, window=window, tolerance=tol,
                                    first_output=first, model_switch=switches.get(method.rsplit("+", 1)[0]))
        info = {"rounds": st.rounds, "evals": st.model_evals + 1, "switch_round": st.switch_round,
                "converged": st.converged}
    info["seconds"] = round(time.perf_counter() - start, 3)
    return y, info


def study(kind: str, steps: int, window: int, batch: int, seed: int, pcm, methods, quick: bool) -> dict:
    pipe, labels = _pipe(), torch.arange(batch) % 10
    model, switch = digits_denoiser(pipe, labels, GUIDANCE), pcm_switches(pipe, labels, pcm)
    config = dict(pipe.scheduler.config)
    x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    sm, noise, reference = trajectory(model, config, kind, steps, x, seed)
    seq_seconds = time.perf_counter() - t0
    own, *_ = paradigms_loop(kind, config, steps, model, x, torch.Generator().manual_seed(seed), 1, 0.1)
    methods = [m for m in methods if m.rsplit("+", 1)[0] in switch or not m.startswith("pcm")]
    out = {"sampler": f"{kind.upper()}-{steps}", "window": window, "batch": batch, "seed": seed,
           "sequential": {"rounds": steps, "seconds": round(seq_seconds, 3)}, "methods": {}}
    for method in methods:
        runs = []
        for tol in _ladder(method, kind):
            y, info = run_method(method, tol, sm, model, switch, config, kind, steps, window, x, noise, seed)
            info.update(tolerance=tol, rms=_rms(y, own if method == "paradigms" else reference))
            runs.append(info)
            if info["rms"] <= TARGETS[0] or (quick and len(runs) >= 2):
                break
        best = {}
        for target in TARGETS:
            ok = [r for r in runs if r["rms"] <= target]
            best[f"{target:g}"] = {**min(ok, key=lambda r: (r["rounds"], r["seconds"])),
                                   # a looser tolerance was tried and missed: the minimum is bracketed
                                   "bracketed": any(r["rms"] > target for r in runs)} if ok else None
        out["methods"][method] = {"runs": runs, "best": best}
        b = best[f"{TARGETS[0]:g}"]
        print(f"  {out['sampler']:9s} B{batch} W{window:<4d} {method:11s} "
              + (f"{b['rounds']:3d} rounds at tol {b['tolerance']:g} (rms {b['rms']:.1e}, {b['seconds']:.2f} s)"
                 if b else "never within 1e-3") + " | " + " ".join(f"{r['tolerance']:g}:{r['rounds']}/{r['rms']:.0e}"
                                                               for r in runs), flush=True)
    for target in TARGETS:
        key = f"{target:g}"
        ref_rounds = {m: (out["methods"][m]["best"][key] or {}).get("rounds") for m in out["methods"]}
        out[f"ratios_at_{key}"] = {
            f"{m}_vs_{b}": (ref_rounds[m] / ref_rounds[b]) if ref_rounds.get(m) and ref_rounds.get(b) else None
            for m in ref_rounds if m.startswith("pcm") for b in ("paradigms", "picard", "newton")
        }
    return out


_PIPE = []


def _pipe():
    """The embedded digits pipeline (loaded once)."""
    if not _PIPE:
        _PIPE.append(fastdiff.load_embedded_pipeline())
        _PIPE[0].set_progress_bar_config(disable=True)
    return _PIPE[0]


def pcm_switches(pipe, labels: torch.Tensor, pcm) -> dict[str, ModelSwitch]:
    """The PCM's model switching around the same class tokens and guidance as the base denoiser: ``"pcm"`` its
    default, ``"pcm[<schedule><rounds>]"`` each of ``_VARIANTS``."""
    glue = lambda network: digits_denoiser(pipe, labels, GUIDANCE, network)  # noqa: E731
    out = {"pcm": pcm.switch(glue, pipe.transformer)}
    for rounds in _RESIDUAL_ROUNDS:
        out[f"pcmr{rounds}"] = _RESIDUAL[0].with_options(residual_rounds=rounds, mode="switch").switch(
            glue, pipe.transformer)
    for rounds in _ACCEPT_ROUNDS:
        out[f"pcma{rounds}"] = _RESIDUAL[0].with_options(residual_rounds=rounds, mode="accept").switch(
            glue, pipe.transformer)
    if _BASELINE:
        out["pcm-v1"] = _BASELINE[0].switch(glue, pipe.transformer)
    for v in _VARIANTS:
        name = v.rstrip("0123456789")
        if (name, int(v[len(name):])) != (pcm.schedule, pcm.switch_rounds):
            out[f"pcm[{v}]"] = pcm.with_options(schedule=name, switch_rounds=int(v[len(name):])).switch(glue, pipe.transformer)
    return out


_VARIANTS: list[str] = [PAPER_VARIANT]
_RESIDUAL: list = []  # the iterate-residual PCM (--residual)
_RESIDUAL_ROUNDS: list[int] = []
_ACCEPT_ROUNDS: list[int] = []
_BASELINE: list = []  # the previously shipped PCM, compared side by side (--baseline-pcm)


def _initial_trajectories(steps: int, n: int, seed: int):
    """The embedded pipeline, ``n`` labels, DDIM-``steps``' step map and the base model's Picard trajectories
    (one round) from the noise of ``seed``."""
    pipe, labels = _pipe(), torch.arange(n) % 10
    sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    sm = step_map_for(sched)
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    tr = picard_trajectories(sm, lambda lb: digits_denoiser(pipe, lb, GUIDANCE), x, labels, 1)
    return pipe, labels, sm, tr


@torch.no_grad()
def one_round(pcm, steps: int, n: int, seed: int) -> dict:
    """rms distance to the fixed point after one Picard update (eq. 1) from ``X^0``, base model vs PCM."""
    pipe, labels, sm, tr = _initial_trajectories(steps, n, seed)
    X, ref = tr.states[0], tr.reference[:, 1:]
    k = torch.arange(steps).repeat(n)
    lab = labels.repeat_interleave(steps)
    out = {"steps": steps, "trajectories": n, "seed": seed,
           "x0": {"trajectory": _rms(X, tr.reference[:, :-1]), "final": _rms(X[:, -1], tr.reference[:, -1])}}
    for name, network in (("base", None), ("pcm", pcm.model), *((("pcm-v1", _BASELINE[0].model),) if _BASELINE else ())):
        den = digits_denoiser(pipe, lab, GUIDANCE, network)
        phi = picard_update(sm, X, den(X.flatten(0, 1), sm.timesteps[k]).view_as(X))
        out[name] = {"trajectory": _rms(phi, ref), "final": _rms(phi[:, -1], ref[:, -1])}
    print(f"  one round DDIM-{steps} x {n}: rms to X* from X^0 {out['x0']['trajectory']:.4f}, base "
          f"{out['base']['trajectory']:.4f} (final point {out['base']['final']:.4f}), PCM {out['pcm']['trajectory']:.4f}"
          f" ({out['pcm']['final']:.4f})" + (f", PCM-v1 {out['pcm-v1']['trajectory']:.4f} ({out['pcm-v1']['final']:.4f})"
                                             if _BASELINE else ""), flush=True)
    return out


@torch.no_grad()
def later_rounds(residual, steps: int, n: int, seed: int, rounds: int = 3) -> dict:
    """rms to ``X*`` (whole trajectory, final point) after the jump PCM's round from ``X^0`` and after each of
    ``rounds`` further rounds of: the jump PCM again, the base model, the base + the residual corrector."""
    from fastdiff.samplers.pcm.residual import ResidualCorrector

    pipe, labels, sm, tr = _initial_trajectories(steps, n, seed)
    X0, ref = tr.states[0], tr.reference
    k, lab = torch.arange(steps).repeat(n), labels.repeat_interleave(steps)
    corrector = ResidualCorrector(residual.inner, pipe.transformer)

    def round_(X: torch.Tensor, network, prev: torch.Tensor | None = None) -> torch.Tensor:
        u = model_input(sm, k, X.flatten(0, 1))
        if network is corrector:
            corrector.residual = u - model_input(sm, k, prev.flatten(0, 1))
        out = digits_denoiser(pipe, lab, GUIDANCE, network)(u, sm.timesteps[k]).view_as(X)
        out[:, 0] = digits_denoiser(pipe, labels, GUIDANCE)(model_input(sm, k[:1], X[:, 0]), sm.timesteps[:1].expand(n))
        return torch.cat([X[:, :1], picard_update(sm, X, out)[:, :-1]], 1)

    def rms(X: torch.Tensor) -> dict:
        return {"trajectory": _rms(X, ref[:, :-1]), "final_state": _rms(X[:, -1], ref[:, -2])}

    X1 = round_(X0, residual.jump.model)
    out = {"steps": steps, "trajectories": n, "seed": seed, "x0": rms(X0), "after_jump": rms(X1)}
    for name, network in (("pcm", residual.jump.model), ("base", None), ("residual", corrector)):
        prev, cur, seq = X0, X1, []
        for _ in range(rounds):
            prev, cur = cur, round_(cur, network, prev)
            seq.append(rms(cur))
        out[name] = seq
    print(f"  later rounds DDIM-{steps} x {n}: after the jump {out['after_jump']['trajectory']:.4f}; then "
          + "; ".join(f"{m} " + " ".join(f"{v['trajectory']:.4f}" for v in out[m]) for m in ("pcm", "base", "residual")),
          flush=True)
    return out


@torch.no_grad()
def fd_study(n: int, tols: dict, pcm, seed: int) -> dict:
    """FD-digits of ``n`` DDIM-25 samples (labels ``i % 10``) per method at the given tolerances."""
    pipe, labels = _pipe(), torch.arange(n) % 10
    model, switch = digits_denoiser(pipe, labels, GUIDANCE), pcm_switches(pipe, labels, pcm)
    config = dict(pipe.scheduler.config)
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    sm, noise, reference = trajectory(model, config, "ddim", 25, x, seed)
    rows = {}
    samples = {"sequential": reference}
    for method, tol in tols.items():
        if tol is not None:
            samples[method], info = run_method(method, tol, sm, model, switch, config, "ddim", 25, 25, x, noise, seed)
    for method, y in samples.items():
        m = evaluate_samples((y.float() / 2 + 0.5).clamp(0, 1), labels, value_range=(0, 1), metric="digits")
        rows[method] = {"fd": m.fd, "accuracy": m.accuracy, "tolerance": tols.get(method), "rms_vs_sequential":
                        _rms(y, reference)}
        print(f"  FD-digits DDIM-25 x {n}: {method:11s} {m.fd:7.2f} (accuracy {m.accuracy:.3f})", flush=True)
    return {"sampler": "DDIM-25", "samples": n, "methods": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--fd-samples", type=int, default=30)
    p.add_argument("--switch-rounds", type=int, default=None)
    p.add_argument("--schedule", default=None)
    p.add_argument("--space", default=None)
    p.add_argument("--pcm", type=Path, default=EMBEDDED_PCM_DIR, help="PCM directory (default: the shipped one)")
    p.add_argument("--variants", default=PAPER_VARIANT, help="extra switching schedules, e.g. 'linear2,step1'")
    p.add_argument("--variant-bases", default="picard,newton", help="solvers the variants run with")
    p.add_argument("--baseline-pcm", type=Path, default=None,
                   help="another PCM directory run side by side as pcm-v1+<--variant-bases> (e.g. the previous one)")
    p.add_argument("--residual", type=Path, default=None,
                   help="an iterate-residual PCM directory (fastdiff.samplers.pcm.residual), run as pcmr<S>+<base>")
    p.add_argument("--residual-rounds", default="1,2", help="corrector rounds S after the PCM round, e.g. '1,2,3'")
    p.add_argument("--residual-accept-rounds", default="",
                   help="corrected solver rounds (accepting points, mode 'accept') after the PCM round, e.g. '1,2,3': "
                        "run as pcma<S>+<base>")
    p.add_argument("--residual-bases", default="picard,newton", help="solvers the residual PCM runs with")
    p.add_argument("--only-pcm", action="store_true",
                   help="run only the PCM methods and the baselines (skip the paper-lambda variants)")
    p.add_argument("--no-fd", action="store_true", help="skip the FD-digits study")
    p.add_argument("--batches", default="1,8", help="batch sizes to run (e.g. '1' and '8' in two processes)")
    p.add_argument("--skip-one-round", action="store_true", help="skip the one-round / later-rounds rms studies")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full", action="store_true", help="batch 8 on every grid (default: DDIM-25 only)")
    p.add_argument("--one-round", type=int, default=8, help="trajectories per grid for the one-round rms")
    p.add_argument("--ddpm", action="store_true", help="also DDPM-1000 (window 80; no PCM is trained for it)")
    p.add_argument("--grids", default=None,
                   help="only these samplers, e.g. 'DDPM-1000' or 'DDIM-25,DDIM-50' (of the cases the other options select)")
    p.add_argument("--out", type=Path, default=RESULTS / "pcm.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = {k: v for k, v in (("switch_rounds", args.switch_rounds), ("schedule", args.schedule),
                                 ("space", args.space)) if v is not None}
    pcm = PicardConsistencyModel.from_pretrained(args.pcm, **options)
    switch_lambdas(pcm.schedule, pcm.switch_rounds)
    _VARIANTS[:] = [v for v in args.variants.split(",") if v]
    for v in _VARIANTS:
        name = v.rstrip("0123456789")
        switch_lambdas(name, int(v[len(name):]))
    grids = (("ddim", 25, 25), ("ddim", 50, 50), ("ddim", 100, 100))
    cases = [(k, s, w, 1) for k, s, w in grids] + [(k, s, w, 8) for k, s, w in (grids if args.full else grids[:1])]
    if args.ddpm:
        cases += [("ddpm", 1000, 80, 1), ("ddpm", 1000, 80, 8)]
    if args.quick:
        cases = [("ddim", 25, 25, 1), ("ddim", 25, 25, 8)]
    if args.grids is not None:
        known = {f"{k.upper()}-{n}" for k, n, _, _ in cases}
        wanted = {g.strip().upper() for g in args.grids.split(",") if g.strip()}
        if not wanted or not wanted <= known:
            p.error(f"--grids must name some of {sorted(known)} (add --ddpm for DDPM-1000), got {args.grids!r}")
        cases = [c for c in cases if f"{c[0].upper()}-{c[1]}" in wanted]
    batches = {int(v) for v in args.batches.split(",") if v}
    seeds = {c: args.seed + i for i, c in enumerate(cases)}  # the same seed per case whichever batches run
    cases = [c for c in cases if c[3] in batches]
    bases = [b for b in args.variant_bases.split(",") if b]
    if args.baseline_pcm is not None:
        _BASELINE[:] = [PicardConsistencyModel.from_pretrained(args.baseline_pcm)]
    if args.only_pcm:
        _VARIANTS[:] = []
    if args.residual is not None:
        from fastdiff.samplers.pcm.residual import ResidualPCM

        _RESIDUAL[:] = [ResidualPCM.from_pretrained(args.residual)]
        _RESIDUAL_ROUNDS[:] = [int(v) for v in args.residual_rounds.split(",") if v]
        _ACCEPT_ROUNDS[:] = [int(v) for v in args.residual_accept_rounds.split(",") if v]
    start = time.perf_counter()
    rounds1 = None if args.skip_one_round else [
        one_round(pcm, steps, 4 if args.quick else args.one_round, args.seed + 200 + steps) for steps in (25, 50, 100)]
    later = [later_rounds(_RESIDUAL[0], steps, 4 if args.quick else args.one_round, args.seed + 300 + steps)
             for steps in (25, 50, 100)] if _RESIDUAL and not args.skip_one_round else None
    methods = METHODS + tuple(f"pcm[{v}]+{b}" for v in _VARIANTS for b in bases) \
        + tuple(f"pcm-v1+{b}" for b in bases if _BASELINE) \
        + tuple(f"pcmr{r}+{b}" for r in _RESIDUAL_ROUNDS for b in args.residual_bases.split(",") if b) \
        + tuple(f"pcma{r}+{b}" for r in _ACCEPT_ROUNDS for b in args.residual_bases.split(",") if b)
    studies = [study(kind, steps, window, batch, seeds[(kind, steps, window, batch)], pcm, methods, args.quick)
               for kind, steps, window, batch in cases]
    b8 = next((s for s in studies if s["sampler"] == "DDIM-25" and s["batch"] == 8), None)
    fd = None
    if b8 is not None and not args.no_fd:
        tols = {m: (r["best"]["0.001"] or {}).get("tolerance") for m, r in b8["methods"].items()}
        fd = fd_study(8 if args.quick else args.fd_samples, tols, pcm, args.seed + 100)
    summary = {}
    for s in studies:
        summary[f"{s['sampler']} B{s['batch']}"] = {
            "rounds_at_1e-3": {"sequential": s["sequential"]["rounds"],
                               **{m: (r["best"]["0.001"] or {}).get("rounds") for m, r in s["methods"].items()}},
            "rounds_at_1e-2": {m: (r["best"]["0.01"] or {}).get("rounds") for m, r in s["methods"].items()},
            "seconds_at_1e-3": {"sequential": s["sequential"]["seconds"],
                                **{m: (r["best"]["0.001"] or {}).get("seconds") for m, r in s["methods"].items()}},
            "ratios_at_1e-3": s["ratios_at_0.001"],
            # methods whose loosest tolerance tried already met rms 1e-3: fewer rounds may exist
            "unbracketed_at_1e-3": [m for m, r in s["methods"].items()
                                    if r["best"]["0.001"] and not r["best"]["0.001"]["bracketed"]],
        }
    result = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": "cpu",
                 "machine": platform.machine(), "threads": args.threads, "torch": torch.__version__,
                 "diffusers": diffusers.__version__, "guidance_scale": GUIDANCE, "targets": list(TARGETS),
                 "baseline_pcm": None if args.baseline_pcm is None else {
                     "path": str(args.baseline_pcm), "training": _BASELINE[0].meta["training"]},
                 "pcm": {"path": str(args.pcm), "schedule": pcm.schedule, "switch_rounds": pcm.switch_rounds,
                         "space": pcm.space, "update": pcm.update, "variants": _VARIANTS,
                         "trained_grids": pcm.meta.get("grids"), "training": pcm.meta["training"]},
                 "residual_pcm": None if not _RESIDUAL else {
                     "path": str(args.residual), "rounds": _RESIDUAL_ROUNDS, "accept_rounds": _ACCEPT_ROUNDS, "training": _RESIDUAL[0].meta["training"],
                     "jump": _RESIDUAL[0].meta["jump"]},
                 "seconds": round(time.perf_counter() - start, 1), "quick": args.quick},
        "summary": summary, "one_round": rounds1, "later_rounds": later, "fd": fd, "studies": studies,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
