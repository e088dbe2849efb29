"""The negative ELBO over a whole split.

``negative_elbo`` averages per-example bounds from ``vdm.losses`` (or
``vdm.ode_likelihood``) over every example a data iterator yields, with standard
errors and the prior / diffusion / decoder breakdown, in bits/dim (images) or nats
(toy data). Discrete models use the exact sum over all T terms
(``losses.discrete_elbo``); continuous ones, or a cheaper discrete estimate,
average K Monte-Carlo samples per example. For toy data with an exact
``log_prob`` the paired gap ELBO - NLL is reported too. The conventions (units,
dequantization, what is and is not comparable) are in README "Likelihood conventions".
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vdm import diffusion, losses

# ---------------------------------------------------------------------------
# The negative ELBO over a split.
# ---------------------------------------------------------------------------

ELBO_TERMS = ("prior", "diffusion", "decoder", "total")


class _Moments:
    """Running count, sum and sum of squares (float64) of per-example values, by name."""

    def __init__(self):
        self.n: dict[str, int] = {}
        self.s: dict[str, float] = {}
        self.ss: dict[str, float] = {}

    def add(self, name: str, values: np.ndarray, mask: np.ndarray | None = None) -> None:
        v = np.asarray(values, np.float64).reshape(-1)
        if mask is not None:
            v = v[np.asarray(mask, bool).reshape(-1)]
        self.n[name] = self.n.get(name, 0) + v.size
        self.s[name] = self.s.get(name, 0.0) + float(v.sum())
        self.ss[name] = self.ss.get(name, 0.0) + float((v * v).sum())

    def summary(self, name: str) -> dict[str, float]:
        n, s, ss = self.n[name], self.s[name], self.ss[name]
        mean = s / n
        var = max(ss - n * mean * mean, 0.0) / (n - 1) if n > 1 else float("nan")
        return {"mean": mean, "stderr": math.sqrt(var / n)}


def _batch_x_mask(batch):
    if isinstance(batch, Mapping):
        return batch["x"], batch.get("mask")
    return batch, None


def discrete_elbo_terms(model_fn_of: Callable, schedule, *, parameterization: str = "eps",
                        variance_type: str = "fixed_small", decoder: str = "discretized",
                        chunk: int = 1) -> Callable:
    """Per-example terms of the exact discrete -ELBO: the sum over all T terms
    (``losses.discrete_elbo``, Ho et al. eq. 5) as ``terms_fn(params, key, x)``.

    ``model_fn_of(params)`` returns the ``model_fn(x_t, t)`` of docs/design.md (e.g.
    ``lambda p: build.make_model_fn(network, process, time_input, p)``). The
    diffusion entry is the sum of L_1 .. L_{T-1}.
    """
    def terms_fn(params, key, x):
        d = losses.discrete_elbo(model_fn_of(params), key, x, schedule, parameterization=parameterization,
                                 variance_type=variance_type, decoder=decoder, chunk=chunk)
        return dict(prior=d["prior"], diffusion=d["diffusion"].sum(-1), decoder=d["decoder"],
                    total=d["total"])

    return terms_fn


def discrete_elbo_mc_terms(model_fn_of: Callable, schedule, num_samples: int, *,
                           parameterization: str = "eps", variance_type: str = "fixed_small",
                           decoder: str = "discretized", importance=None) -> Callable:
    """Per-example Monte-Carlo -ELBO of a discrete model from ``num_samples`` timesteps
    (``losses.discrete_elbo_mc``) as ``terms_fn(params, key, x)``: the prior term and the total
    (its diffusion and decoder parts are not separated by the estimator)."""
    def terms_fn(params, key, x):
        d = losses.discrete_elbo_mc(model_fn_of(params), key, x, schedule, num_samples,
                                    parameterization=parameterization, variance_type=variance_type,
                                    decoder=decoder, importance=importance)
        return dict(prior=d["prior"], total=d["total"])

    return terms_fn


def vdm_elbo_terms(model_fn_of: Callable, log_snr_fn: Callable, num_samples: int, *, T: int = 0,
                   parameterization: str = "eps", decoder: str = "categorical",
                   num_bins: int = 256, antithetic: bool = True) -> Callable:
    """Per-example -ELBO of a continuous-time (T = 0) or T-step VDM averaged over
    ``num_samples`` Monte-Carlo draws of ``losses.vdm_loss`` (Kingma et al. 2021, eqs. 10-17),
    as ``terms_fn(params, key, x)``. ``log_snr_fn(params, t)`` is the (possibly learned)
    schedule, as ``build.Process.log_snr``.

    ``antithetic``: each example's K draws take the low-discrepancy times
    u_k = (u + k/K) mod 1, u ~ U(0, 1) drawn per example (Kingma et al. App. I.1, here over one
    example's draws), so examples stay independent and the standard error over examples is
    valid; otherwise every time is drawn independently.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")

    def terms_fn(params, key, x):
        k_u, k_draws = jax.random.split(key)
        B = x.shape[0]
        offsets = jnp.arange(num_samples, dtype=jnp.float32) / num_samples if antithetic else None
        u = (jnp.mod(jax.random.uniform(k_u, (B, 1)) + offsets, 1.0) if antithetic
             else jax.random.uniform(k_u, (B, num_samples)))

        def one(args):
            k, u_k = args
            total, m = losses.vdm_loss(model_fn_of(params), lambda t: log_snr_fn(params, t), k, x, T=T,
                                       parameterization=parameterization, decoder=decoder,
                                       num_bins=num_bins, u=u_k)
            return dict(prior=m["prior"], diffusion=m["diffusion"], decoder=m["decoder"], total=total)

        draws = jax.lax.map(one, (jax.random.split(k_draws, num_samples), u.T))
        return jax.tree.map(lambda a: a.mean(0), draws)

    return terms_fn


def vdm_elbo_exact_terms(model_fn_of: Callable, log_snr_fn: Callable, T: int, *, chunk: int = 1,
                         parameterization: str = "eps", decoder: str = "categorical",
                         num_bins: int = 256) -> Callable:
    """Per-example -ELBO of a VDM at T steps with the T diffusion terms summed exactly
    (``losses.vdm_elbo_exact``, Kingma et al. eq. 15) as ``terms_fn(params, key, x)``; for a
    continuous-time model it is the bound of its T-step discretisation (>= the continuous one)."""
    def terms_fn(params, key, x):
        return losses.vdm_elbo_exact(model_fn_of(params), lambda t: log_snr_fn(params, t), key, x, T,
                                     chunk=chunk, parameterization=parameterization, decoder=decoder,
                                     num_bins=num_bins)

    return terms_fn


def vdm_estimate_variance(model_fn_of: Callable, log_snr_fn: Callable, params, batches: Iterable, key,
                          num_draws: int, *, T: int = 0, parameterization: str = "eps",
                          decoder: str = "categorical", num_dims: int | None = None,
                          max_batches: int | None = None) -> dict:
    """The variance of the one-draw VDM loss estimate (Kingma et al. 2021, §5.2 and Fig. 4):
    for every example, ``num_draws`` independent draws of (t, eps, z_0) give the sample
    variance of ``losses.vdm_loss``; returns its mean over the examples of ``batches`` with
    the standard error of that mean, in (bits/dim)^2 with ``num_dims`` (else nats^2), and the
    same for the diffusion term alone: {"unit", "num_examples", "num_draws", "terms"}.
    """
    if not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")

    def variances(params, key, x):
        def one(k):
            total, m = losses.vdm_loss(model_fn_of(params), lambda t: log_snr_fn(params, t), k, x, T=T,
                                       antithetic=False, parameterization=parameterization,
                                       decoder=decoder)
            return jnp.stack([total, m["diffusion"]])

        draws = jax.lax.map(one, jax.random.split(key, num_draws))  # [K, 2, B]
        return jnp.var(draws, axis=0, ddof=1)

    jitted = jax.jit(variances)
    scale = 1.0 / (num_dims * math.log(2.0)) ** 2 if num_dims else 1.0
    moments = _Moments()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, mask = _batch_x_mask(batch)
        v = np.asarray(jax.device_get(jitted(params, jax.random.fold_in(key, i), x)), np.float64) * scale
        moments.add("total", v[0], mask)
        moments.add("diffusion", v[1], mask)
    return {"unit": "(bits/dim)^2" if num_dims else "nats^2", "num_examples": moments.n["total"],
            "num_draws": num_draws, "terms": {k: moments.summary(k) for k in ("total", "diffusion")}}


def ode_nll_terms(model_fn_of: Callable, grid_of: Callable, *, parameterization: str = "eps",
                  variance_type: str = "fixed_small", divergence: str = "exact", num_probes: int = 2,
                  probe: str = "rademacher", dequantize: bool = False) -> Callable:
    """Per-example -log p(x) from the probability-flow ODE (``vdm.ode_likelihood``, Song et al.
    2021 App. D) as ``terms_fn(params, key, x)``: ``total`` in nats (with Hutchinson's
    divergence an unbiased estimate; its probe noise enters the standard error over
    examples that ``negative_elbo`` reports). ``grid_of(params) -> (times, log_snr)`` is the integration grid
    (``ode_likelihood.discrete_grid`` / ``continuous_grid``). With ``dequantize`` (8-bit
    images on their grid) x gets uniform noise over its bin first (from ``key``); pass
    ``dequantized=True`` to ``negative_elbo`` to report the bound on the 8-bit scale."""
    from vdm import ode_likelihood

    def terms_fn(params, key, x):
        k_u, k_probe = jax.random.split(key)
        model = model_fn_of(params)

        x_in = ode_likelihood.dequantize(k_u, x) if dequantize else x
        times, log_snr = grid_of(params)
        r = ode_likelihood.ode_log_likelihood(
            lambda x_t, t: diffusion.split_variance_output(model(x_t, t), variance_type)[0], x_in, times,
            log_snr, k_probe, parameterization=parameterization, divergence=divergence,
            num_probes=num_probes, probe=probe)
        return dict(total=-r["log_prob"])

    return terms_fn


UNIT_DEQUANTIZED = "bits/dim, 8-bit scale (dequantized density + log2(127.5))"


def negative_elbo(terms_fn: Callable, params, batches: Iterable, key, *, num_dims: int | None = None,
                  log_prob_fn: Callable | None = None, max_batches: int | None = None,
                  method: str = "", dequantized: bool = False, quantity: str = "negative ELBO",
                  labels: bool = False) -> dict:
    """The negative ELBO averaged over every example of ``batches``, with standard errors.

    ``terms_fn(params, key, x) -> dict`` gives per-example terms in nats,
    arrays of shape [B]: ``total`` and any of ``prior``, ``diffusion``,
    ``decoder`` (``discrete_elbo_terms``, ``discrete_elbo_mc_terms``,
    ``vdm_elbo_terms``); it is jitted here with ``params`` as an argument.
    Batch i gets the key ``fold_in(key, i)``. ``batches`` yields arrays
    [B, ...] or dicts with ``x`` [B, ...] and optionally ``mask`` [B] (False
    on padding, which is left out; see ``epoch_batches``); ``max_batches``
    stops early. With ``labels`` (a class-conditional model's bound on -log p(x | y)) it is
    ``terms_fn(params, key, x, label)`` with the batches' ``label`` [B].

    With ``num_dims`` (images) every term is reported in bits/dim
    (``losses.bits_per_dim``), otherwise in nats per example. With
    ``log_prob_fn`` (toy data with an exact density) the exact NLL -log p(x)
    and the paired gap (negative ELBO - NLL, >= 0 in expectation) are
    reported too. The standard errors are those of the mean over examples
    (std / sqrt(N)); they include the Monte-Carlo noise of the bound.

    ``dequantized`` (8-bit images fed as uniformly dequantized data, ``data.dequantize``):
    the terms are a density's; ``total`` and ``decoder`` get D log(127.5) nats
    (``losses.dequantized_nats``), so the total is a bound in bits/dim on the 8-bit scale,
    comparable with a discrete decoder's, and the unit says so.

    ``quantity`` names what ``total`` is in the printed table (e.g. "negative log-likelihood"
    for the probability-flow ODE).

    Returns {"unit", "num_examples", "method", "quantity", "terms": {name: {"mean", "stderr"}}}.
    """
    if num_dims is not None and (not isinstance(num_dims, int) or num_dims < 1):
        raise ValueError(f"num_dims must be a positive integer or None, got {num_dims!r}")
    if dequantized and num_dims is None:
        raise ValueError("dequantized needs num_dims (8-bit images)")
    jitted = jax.jit(terms_fn)
    moments = _Moments()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, mask = _batch_x_mask(batch)
        terms = jax.device_get(jitted(params, jax.random.fold_in(key, i), x, *([batch["label"]] if labels else [])))
        if "total" not in terms:
            raise ValueError(f"terms_fn must return a dict with a 'total' entry, got keys {sorted(terms)}")
        values = {k: np.asarray(terms[k], np.float64) for k in ELBO_TERMS if k in terms}
        if dequantized:
            for k in ("total", "decoder"):
                if k in values:
                    values[k] = losses.dequantized_nats(values[k], num_dims)
        if log_prob_fn is not None:
            values["exact_nll"] = -np.asarray(log_prob_fn(x), np.float64)
            values["gap"] = values["total"] - values["exact_nll"]
        for name, v in values.items():
            if v.shape != (np.shape(x)[0],):
                raise ValueError(f"term {name!r} must have one value per example, shape "
                                 f"({np.shape(x)[0]},), got {v.shape}")
            moments.add(name, losses.bits_per_dim(v, num_dims) if num_dims else v, mask)
    if not moments.n:
        raise ValueError("batches yielded no data")
    order = [k for k in ELBO_TERMS + ("exact_nll", "gap") if k in moments.n]
    return {
        "unit": (UNIT_DEQUANTIZED if dequantized else "bits/dim") if num_dims else "nats",
        "num_examples": moments.n["total"],
        "method": method,
        "quantity": quantity,
        "terms": {k: moments.summary(k) for k in order},
    }


def format_table(result: Mapping) -> str:
    """A fixed-width table of a ``negative_elbo`` result (one row per term)."""
    unit = result["unit"]
    lines = [f"{result.get('quantity', 'negative ELBO')} ({result['method'] or 'estimate'}), "
             f"{result['num_examples']} examples",
             f"{'term':<12}{'mean':>14}{'stderr':>12}  [{unit}]"]
    for name, r in result["terms"].items():
        lines.append(f"{name:<12}{r['mean']:>14.5f}{r['stderr']:>12.5f}")
    return "\n".join(lines)


def save_json(path, result: Mapping) -> str:
    """Write a result dict as indented JSON (creating the directory)."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    return os.fspath(path)


def epoch_batches(dataset, batch_size: int) -> Iterable[dict]:
    """A ``vdm.data.Dataset`` split once, as flat batches {"x": [B, ...], "mask": [B]} (and
    "label" when the data have labels) for ``negative_elbo``; ``mask`` is False on the padding
    of the last batch."""
    for batch in dataset.iterate_epoch(batch_size):
        yield {k: np.reshape(v, (-1,) + np.shape(v)[2:]) for k, v in batch.items()}
