"""Sampler accuracy vs number of steps, with the exact (perfect) Gaussian-mixture denoiser.

For each sampler and step count, draws N samples with ``vdm.samplers.sample``
from the exact model (``vdm.exact``) and prints the largest error, over the
mixture's components, of the sample weight / mean / variance (hard assignment
to the most responsible component) against the same statistics of 400k exact
mixture samples. The first row is the Monte-Carlo floor: N exact samples.

Mixtures: seed 002's 1-D 1/3 N(-4, 1) + 2/3 N(4, 1), and a 2-D two-component
mixture with diagonal covariances. Schedules: discrete linear (Ho et al., T=1000)
and continuous cosine / VP-linear (so the N(0, I) prior is exact to < 1e-3).

``--table nfe`` instead compares samplers at equal numbers of network evaluations
(NFE 5, 10, 20, 50, 100; a Heun-type row takes n = (NFE + 1) // 2 steps, 2n - 1
calls): the moment errors as above, then for the deterministic samplers the RMS
distance of each sample to a 1000-step DPM-Solver++(3M) solution from the same
x_T on the same levels (the ODE's discretization error), and the measured order
of convergence: minus the slope of a least-squares fit of log error against
log NFE over NFE 20, 50, 100.

    python scripts/sampler_accuracy.py [--n 20000] [--dims 1 2] [--only "ddim"] [--table steps|nfe]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vdm import exact, samplers, schedules  # noqa: E402

MIXTURES = {
    1: exact.gaussian_mixture([1 / 3, 2 / 3], [-4.0, 4.0], 1.0),
    2: exact.gaussian_mixture([0.3, 0.7], [[-3.0, -1.0], [2.0, 2.0]], [[0.5, 1.0], [1.0, 0.25]]),
}
DISCRETE = schedules.discrete_schedule("linear", 1000)
COSINE = schedules.continuous_schedule("cosine")
VP_LINEAR = schedules.continuous_schedule("vp_linear")
LANGEVIN = dict(sampler="langevin", schedule=DISCRETE, num_steps=10, spacing="karras", sigma_min=0.1,
                step_size=0.005)

# (row label, sample() keyword arguments, the argument the step count goes to)
ROWS = [
    ("ancestral fixed_small (respaced)", dict(schedule=DISCRETE), "num_steps"),
    ("ancestral fixed_large (respaced)", dict(schedule=DISCRETE, variance_type="fixed_large"), "num_steps"),
    ("ancestral learned_range (respaced)", dict(schedule=DISCRETE, variance_type="learned_range"), "num_steps"),
    ("ancestral learned (full chain only)", dict(schedule=DISCRETE, variance_type="learned"), "num_steps"),
    ("ddim eta=0", dict(sampler="ddim", schedule=DISCRETE), "num_steps"),
    ("ddim eta=0.5", dict(sampler="ddim", schedule=DISCRETE, eta=0.5), "num_steps"),
    ("ddim eta=1", dict(sampler="ddim", schedule=DISCRETE, eta=1.0), "num_steps"),
    ("pc (r=0.16, 1 corrector step)", dict(sampler="pc", schedule=DISCRETE), "num_steps"),
    ("langevin (10 levels; N steps/level)", LANGEVIN, "steps_per_level"),
    ("ode euler, VP-linear, uniform t", dict(sampler="ode", method="euler", log_snr_fn=VP_LINEAR), "num_steps"),
    ("ode heun, VP-linear, uniform t", dict(sampler="ode", method="heun", log_snr_fn=VP_LINEAR), "num_steps"),
    ("ode heun, cosine, karras rho=7", dict(sampler="ode", method="heun", log_snr_fn=COSINE, spacing="karras"),
     "num_steps"),
    ("continuous ancestral (VDM), cosine", dict(log_snr_fn=COSINE), "num_steps"),
]
ROWS_2D = ("ancestral fixed_small (respaced)", "ancestral fixed_large (respaced)",
           "ancestral learned_range (respaced)", "ddim eta=0", "pc (r=0.16, 1 corrector step)",
           "ode heun, cosine, karras rho=7", "continuous ancestral (VDM), cosine")
STEPS = (10, 25, 100, 1000)

FLOW = schedules.continuous_schedule("flow")
KARRAS = dict(log_snr_fn=COSINE, spacing="karras")
FLOW_T = dict(log_snr_fn=FLOW, parameterization="flow")
EDM_IMAGENET = dict(S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)  # Karras et al. 2022, Table 5
NFE = (5, 10, 20, 50, 100)
# (row label, sample() kwargs, model calls per step: 1, or 2 for Heun-type rows (2n - 1 for n steps),
#  deterministic: whether the discretization error against the reference ODE solution is shown)
NFE_ROWS = [
    ("ancestral, linear T=1000, linspace", dict(schedule=DISCRETE), 1, False),
    ("ancestral, cosine, karras", dict(KARRAS), 1, False),
    ("ddim, linear T=1000, linspace", dict(sampler="ddim", schedule=DISCRETE), 1, True),
    ("ddim, cosine, karras", dict(sampler="ddim", **KARRAS), 1, True),
    ("heun (ode), cosine, karras", dict(sampler="ode", method="heun", **KARRAS), 2, True),
    ("dpm_solver 2M, linear T=1000, linspace", dict(sampler="dpm_solver", schedule=DISCRETE), 1, True),
    ("dpm_solver 2M, cosine, karras", dict(sampler="dpm_solver", **KARRAS), 1, True),
    ("dpm_solver 3M, cosine, karras", dict(sampler="dpm_solver", order=3, **KARRAS), 1, True),
    ("edm S_churn=40, cosine, karras", dict(sampler="edm", **EDM_IMAGENET, **KARRAS), 2, False),
    ("flow euler, flow schedule, uniform t", dict(sampler="flow", **FLOW_T), 1, True),
    ("flow heun, flow schedule, uniform t", dict(sampler="flow", method="heun", **FLOW_T), 2, True),
    ("dpm_solver 2M, flow schedule, uniform t", dict(sampler="dpm_solver", **FLOW_T), 1, True),
]
FIT_NFE = (20, 50, 100)


def errors(mixture, x, ref):
    w, m, v = exact.component_stats(mixture, x)
    return tuple(float(np.max(np.abs(a - b))) for a, b in zip((w, m, v), ref))


def _model(mixture, kwargs):
    return exact.model_fn(mixture, kwargs.get("parameterization", "eps"), schedule=kwargs.get("schedule"),
                          log_snr_fn=kwargs.get("log_snr_fn"),
                          variance_type=kwargs.get("variance_type", "fixed_small"))


def _levels(kwargs):
    """The sample() arguments that fix the ODE being solved: levels, spacing, parameterization."""
    return {k: v for k, v in kwargs.items() if k in ("schedule", "log_snr_fn", "spacing", "parameterization")}


def order_of(nfe, err):
    """Minus the least-squares slope of log err against log NFE (the measured order)."""
    return -float(np.polyfit(np.log(nfe), np.log(err), 1)[0])


def nfe_table(args, key, dim, mixture, ref):
    """Moment errors and ODE discretization errors against NFE, and measured orders (--table nfe)."""
    floor = errors(mixture, exact.sample(jax.random.PRNGKey(2), mixture, args.n), ref)
    print(f"\n{dim}-D mixture, N={args.n}: max error of weight / mean / variance over components, "
          "at equal NFE\n")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in NFE) + " |")
    print("|---|" + "---|" * len(NFE))
    print("| exact samples (MC floor) | " + " | ".join(["%.3f / %.3f / %.3f" % floor] * len(NFE)) + " |")
    paths, references = {}, {}
    for label, kwargs, calls, deterministic in NFE_ROWS:
        if args.only not in label:
            continue
        model = _model(mixture, kwargs)
        levels = _levels(kwargs)
        ref_key = tuple(sorted((k, id(v) if callable(v) or k == "schedule" else v) for k, v in levels.items()))
        if deterministic and ref_key not in references:
            references[ref_key] = samplers.sample(model, key, (args.n, dim), sampler="dpm_solver", order=3,
                                                  num_steps=1000, **levels)
        cells, path = [], []
        for nfe in NFE:
            steps = nfe if calls == 1 else (nfe + 1) // 2
            t0 = time.time()
            x = samplers.sample(model, key, (args.n, dim), num_steps=steps, **kwargs)
            cells.append("%.3f / %.3f / %.3f" % errors(mixture, x, ref))
            if deterministic:
                path.append(float(np.sqrt(np.mean(np.sum((np.asarray(x) - references[ref_key]) ** 2, -1)))))
            print(f"  [{label}, NFE {nfe}: {time.time() - t0:.1f} s]", file=sys.stderr)
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        if deterministic:
            paths[label] = (path, [n if calls == 1 else 2 * ((n + 1) // 2) - 1 for n in NFE])
    print(f"\n{dim}-D mixture: RMS distance to the 1000-step DPM-Solver++(3M) solution from the same x_T "
          f"(discretization error), and the measured order (fit over NFE {FIT_NFE})\n")
    print("| sampler | " + " | ".join(f"NFE {n}" for n in NFE) + " | order |")
    print("|---|" + "---|" * (len(NFE) + 1))
    for label, (path, used) in paths.items():
        fit = [i for i, n in enumerate(NFE) if n in FIT_NFE]
        order = order_of([used[i] for i in fit], [path[i] for i in fit])
        print(f"| {label} | " + " | ".join("%.2e" % e for e in path) + f" | {order:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="samples per cell")
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--only", default="", help="run only the rows whose label contains this")
    parser.add_argument("--table", default="steps", choices=["steps", "nfe"],
                        help="steps: the samplers at 10..1000 steps; nfe: at equal network evaluations")
    args = parser.parse_args()
    key = jax.random.PRNGKey(0)
    for dim in args.dims:
        if args.table == "nfe":
            mixture = MIXTURES[dim]
            ref = exact.component_stats(mixture, exact.sample(jax.random.PRNGKey(1), mixture, 400_000))
            nfe_table(args, key, dim, mixture, ref)
            continue
        mixture = MIXTURES[dim]
        ref = exact.component_stats(mixture, exact.sample(jax.random.PRNGKey(1), mixture, 400_000))
        print(f"\n{dim}-D mixture, N={args.n}: max error of weight / mean / variance over components\n")
        print("| sampler | " + " | ".join(f"{s} steps" for s in STEPS) + " |")
        print("|---|" + "---|" * len(STEPS))
        floor = errors(mixture, exact.sample(jax.random.PRNGKey(2), mixture, args.n), ref)
        print("| exact samples (MC floor) | " + " | ".join(["%.3f / %.3f / %.3f" % floor] * len(STEPS)) + " |")
        for label, kwargs, arg in ROWS:
            if (dim == 2 and label not in ROWS_2D) or args.only not in label:
                continue
            model = exact.model_fn(mixture, kwargs.get("parameterization", "eps"),
                                   schedule=kwargs.get("schedule"), log_snr_fn=kwargs.get("log_snr_fn"),
                                   variance_type=kwargs.get("variance_type", "fixed_small"))
            cells = []
            for steps in STEPS:
                if kwargs.get("variance_type") == "learned" and steps != DISCRETE.T:
                    cells.append("n/a")
                    continue
                t0 = time.time()
                x = samplers.sample(model, key, (args.n, dim), **{**kwargs, arg: steps})
                e = errors(mixture, x, ref)
                cells.append("%.3f / %.3f / %.3f" % e)
                print(f"  [{label}, {steps}: {time.time() - t0:.1f} s]", file=sys.stderr)
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
