"""Sampler accuracy vs number of steps, with the exact (perfect) Gaussian-mixture denoiser.

For each sampler and step count, draws N samples with ``vdm.samplers.sample``
from the exact model (``vdm.exact``) and prints the largest error, over the
mixture's components, of the sample weight / mean / variance (hard assignment
to the most responsible component) against the same statistics of 400k exact
mixture samples. The first row is the Monte-Carlo floor: N exact samples.

Mixtures: seed 002's 1-D 1/3 N(-4, 1) + 2/3 N(4, 1), and a 2-D two-component
mixture with diagonal covariances. Schedules: discrete linear (Ho et al., T=1000)
and continuous cosine / VP-linear (so the N(0, I) prior is exact to < 1e-3).

    python scripts/sampler_accuracy.py [--n 20000] [--dims 1 2] [--only "ddim"]
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


def errors(mixture, x, ref):
    w, m, v = exact.component_stats(mixture, x)
    return tuple(float(np.max(np.abs(a - b))) for a, b in zip((w, m, v), ref))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="samples per cell")
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--only", default="", help="run only the rows whose label contains this")
    args = parser.parse_args()
    key = jax.random.PRNGKey(0)
    for dim in args.dims:
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
