"""Accuracy of the probability-flow ODE likelihood against the true log-density of the toy
mixtures (seed 002's mixture1d 1/3 N(-4, 1) + 2/3 N(4, 1) and gaussians2d), with the exact
mixture denoiser (vdm.exact) as the model, so every error is the integrator's.

    python scripts/ode_likelihood_accuracy.py [--num_points=1000]

Prints a markdown table of mean |log p_ODE(x) - log p(x)| (nats) over held-out points per Heun
step count and schedule, and Hutchinson (4 probes) minus the exact divergence with its
standard error for the 2-D mixture and for a pair of isotropic modes on the diagonal (whose
Jacobian, unlike gaussians2d's, is not diagonal, so Rademacher probes are not exact).
"""
import math
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdm import cli  # noqa: E402  (after the path insert)

cli.quiet_startup(tensorflow=False)

_N = flags.DEFINE_integer("num_points", 1000, "Held-out points per mixture.")
STEPS = (10, 20, 40, 80, 160, 320)


def main(argv):
    del argv
    import jax
    import numpy as np

    from vdm import exact, ode_likelihood as ol, schedules, toy_data

    mixtures = {
        "mixture1d": exact.gaussian_mixture([1 / 3, 2 / 3], [-4.0, 4.0], 1.0),
        "gaussians2d": exact.gaussian_mixture([0.5, 0.5], np.array([[-5.0, 0.0], [5.0, 0.0]]) / math.sqrt(26),
                                              np.array([[1 / 26, 1.0], [1 / 26, 1.0]])),
    }
    grids = {
        "continuous cosine": (lambda n: ol.continuous_grid(schedules.continuous_schedule("cosine"), n),
                              dict(log_snr_fn=schedules.continuous_schedule("cosine"))),
        "continuous vp_linear": (lambda n: ol.continuous_grid(schedules.continuous_schedule("vp_linear"), n),
                                 dict(log_snr_fn=schedules.continuous_schedule("vp_linear"))),
        "discrete linear T=1000": (lambda n: ol.discrete_grid(schedules.discrete_schedule("linear", 1000).log_snr, n),
                                   dict(schedule=schedules.discrete_schedule("linear", 1000))),
    }
    print("| data | schedule | " + " | ".join(f"{n} steps" for n in STEPS) + " |")
    print("|---|---|" + "---:|" * len(STEPS))
    for name, mix in mixtures.items():
        x = exact.sample(jax.random.PRNGKey(7), mix, _N.value)
        true = np.asarray(toy_data.get(name).log_prob(np.asarray(x)), np.float64)
        for gname, (grid, kw) in grids.items():
            model = exact.model_fn(mix, "eps", **kw)
            errs = []
            for n in STEPS:
                times, lam = grid(n)
                r = jax.jit(lambda x: ol.ode_log_likelihood(model, x, times, lam))(x)
                errs.append(np.mean(np.abs(np.float64(r["log_prob"]) - true)))
            print(f"| {name} | {gname} | " + " | ".join(f"{e:.4f}" for e in errs) + " |")
    cos = schedules.continuous_schedule("cosine")
    times, lam = ol.continuous_grid(cos, 160)
    diag = exact.gaussian_mixture([0.5, 0.5], [[-1.0, -1.0], [1.0, 1.0]], 0.1)
    print("\nHutchinson (4 probes) minus exact divergence, cosine, 160 steps (nats, mean over points):")
    for name, mix in [("gaussians2d", mixtures["gaussians2d"]), ("diagonal pair", diag)]:
        x = exact.sample(jax.random.PRNGKey(8), mix, _N.value)
        model = exact.model_fn(mix, "eps", log_snr_fn=cos)
        ex = jax.jit(lambda x: ol.ode_log_likelihood(model, x, times, lam))(x)
        for probe in ol.PROBES:
            h = jax.jit(lambda x: ol.ode_log_likelihood(model, x, times, lam, jax.random.PRNGKey(9),
                                                        divergence="hutchinson", num_probes=4, probe=probe))(x)
            d = np.float64(h["log_prob"]) - np.float64(ex["log_prob"])
            se = math.sqrt(np.mean(np.float64(h["stderr"]) ** 2) / x.shape[0])
            print(f"  {name}, {probe}: {d.mean():+.5f} (stderr {se:.5f})")

if __name__ == "__main__":
    cli.run(main)
