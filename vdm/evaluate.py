"""Evaluation: the negative ELBO over a whole split, and sample-quality metrics.

Likelihood. ``negative_elbo`` averages per-example bounds from ``vdm.losses``
over every example a data iterator yields, with standard errors and the
prior / diffusion / decoder breakdown, in bits/dim (images) or nats (toy
data). Discrete models use the exact sum over all T terms
(``losses.discrete_elbo``); continuous ones, or a cheaper discrete estimate,
average K Monte-Carlo samples per example. For toy data with an exact
``log_prob`` the paired gap ELBO - NLL is reported too.

Samples. Kernel MMD (unbiased estimator, Gretton et al. 2012, eq. 3), sliced
Wasserstein distance (Bonneel et al. 2015), and the Fréchet distance between
Gaussian fits of features (Heusel et al. 2017, eq. 6) of a small classifier
trained on the same data (cached in the workdir) or of InceptionV3 (FID) when
the user supplies its weights.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Callable, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm import losses

# ---------------------------------------------------------------------------
# Kernel MMD.
# ---------------------------------------------------------------------------


def _flat(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape [N, ...] with N >= 2, got {x.shape}")
    return x.reshape(x.shape[0], -1)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(x, y, max_points: int = 1000) -> float:
    """Median heuristic (Gretton et al. 2012, §8): the median pairwise distance of the pooled
    samples (the first ``max_points`` of each set)."""
    z = np.concatenate([_flat(x, "x")[:max_points], _flat(y, "y")[:max_points]])
    d = np.sqrt(_sq_dists(z, z)[np.triu_indices(len(z), k=1)])
    return float(np.median(d))


def _kernel_sum(a: np.ndarray, b: np.ndarray, bandwidths: np.ndarray, chunk: int = 1024) -> float:
    """sum_ij k(a_i, b_j) for k = mean over h of exp(-|a - b|^2 / (2 h^2)), in row chunks."""
    total = 0.0
    for i in range(0, len(a), chunk):
        d2 = _sq_dists(a[i:i + chunk], b)
        total += np.exp(-d2[..., None] / (2.0 * bandwidths ** 2)).mean(-1).sum()
    return float(total)


def mmd(x, y, bandwidths=None) -> float:
    """Unbiased estimate of the squared MMD between the distributions of x [N, ...] and y [M, ...]
    (Gretton et al. 2012, eq. 3):

      MMD_u^2 = sum_{i != j} k(x_i, x_j) / (N (N-1)) + sum_{i != j} k(y_i, y_j) / (M (M-1))
                - 2 sum_ij k(x_i, y_j) / (N M),

    with k the RBF kernel exp(-|a - b|^2 / (2 h^2)) averaged over ``bandwidths``
    (a number or a sequence; default the median heuristic). It is unbiased, so
    it can be slightly negative when the distributions are equal.
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of dimensions, got {x.shape} and {y.shape}")
    h = np.atleast_1d(np.asarray(median_bandwidth(x, y) if bandwidths is None else bandwidths, np.float64))
    if np.any(h <= 0):
        raise ValueError(f"bandwidths must be positive, got {h}")
    n, m = len(x), len(y)
    # k(a, a) = 1 on the diagonal, so the off-diagonal sums drop N (resp. M) ones.
    kxx = (_kernel_sum(x, x, h) - n) / (n * (n - 1))
    kyy = (_kernel_sum(y, y, h) - m) / (m * (m - 1))
    kxy = _kernel_sum(x, y, h) / (n * m)
    return kxx + kyy - 2.0 * kxy


# ---------------------------------------------------------------------------
# Sliced Wasserstein distance.
# ---------------------------------------------------------------------------


def wasserstein_1d(u, v, p: float = 2.0) -> np.ndarray:
    """W_p between empirical 1-D distributions, batched over leading axes: u [..., N], v [..., M].

    W_p^p = int_0^1 |F_u^{-1}(q) - F_v^{-1}(q)|^p dq, computed exactly for the
    step quantile functions by merging their breakpoints i/N and j/M.
    """
    u, v = np.sort(np.asarray(u, np.float64), -1), np.sort(np.asarray(v, np.float64), -1)
    n, m = u.shape[-1], v.shape[-1]
    q = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(np.concatenate([[0.0], q]))
    mid = q - widths / 2
    iu = np.minimum((mid * n).astype(int), n - 1)
    iv = np.minimum((mid * m).astype(int), m - 1)
    wpp = (np.abs(u[..., iu] - v[..., iv]) ** p * widths).sum(-1)
    return wpp ** (1.0 / p)


def sliced_wasserstein(key, x, y, num_projections: int = 128, p: float = 2.0) -> float:
    """Sliced Wasserstein distance (Bonneel et al. 2015):

      SW_p(x, y) = ( E_theta [ W_p^p(theta . x, theta . y) ] )^(1/p),

    theta uniform on the unit sphere, estimated with ``num_projections``
    directions drawn from ``key``. For 1-D data it is W_p itself.
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of dimensions, got {x.shape} and {y.shape}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    theta = np.asarray(jax.random.normal(key, (num_projections, x.shape[1])), np.float64)
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    wp = wasserstein_1d(theta @ x.T, theta @ y.T, p)
    return float(np.mean(wp ** p) ** (1.0 / p))


def toy_sample_metrics(key, samples, reference, num_projections: int = 128) -> dict:
    """MMD (median-heuristic RBF, unbiased) and sliced W2 between model samples and fresh data."""
    return {"mmd": mmd(samples, reference),
            "sliced_wasserstein": sliced_wasserstein(key, samples, reference, num_projections)}


def mode_fractions(samples, centres) -> np.ndarray:
    """The fraction of samples [N, D] nearest to each of the mode centres [K, D] (or [K] in 1-D),
    e.g. the mass on each component of the seed 002 mixture (1/3, 2/3)."""
    x = _flat(samples, "samples")
    c = np.asarray(centres, np.float64).reshape(-1, x.shape[1])
    nearest = np.argmin(_sq_dists(x, c), axis=1)
    return np.bincount(nearest, minlength=len(c)) / len(x)


# ---------------------------------------------------------------------------
# Fréchet distance between Gaussian fits.
# ---------------------------------------------------------------------------


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, F], in float64."""
    f = _flat(features, "features")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2)
    (Heusel et al. 2017, eq. 6; Dowson & Landau 1982):

      d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^{1/2} cov2 cov1^{1/2})^{1/2}).

    The matrix square root is taken of the symmetric PSD matrix
    cov1^{1/2} cov2 cov1^{1/2} by eigen-decomposition (same trace as
    (cov1 cov2)^{1/2}), so no complex parts or singular-matrix failures arise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if not (mu1.shape == mu2.shape and cov1.shape == cov2.shape == mu1.shape * 2):
        raise ValueError(f"shapes must be mu [F], cov [F, F] for both, got {mu1.shape}, {cov1.shape}, "
                         f"{mu2.shape}, {cov2.shape}")
    s1 = _psd_sqrt(cov1)
    w = np.linalg.eigvalsh(s1 @ cov2 @ s1)
    tr_sqrt = np.sqrt(np.clip(w, 0.0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def frechet_distance_of_features(features_a, features_b) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N, F] and [M, F]."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


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

    ``model_fn_of(params)`` returns the ``model_fn(x_t, t)`` of DESIGN.md (e.g.
    ``lambda p: train.make_model_fn(network, process, time_input, p)``). The
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
    schedule, as ``train.Process.log_snr``.

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


def negative_elbo(terms_fn: Callable, params, batches: Iterable, key, *, num_dims: int | None = None,
                  log_prob_fn: Callable | None = None, max_batches: int | None = None,
                  method: str = "") -> dict:
    """The negative ELBO averaged over every example of ``batches``, with standard errors.

    ``terms_fn(params, key, x) -> dict`` gives per-example terms in nats,
    arrays of shape [B]: ``total`` and any of ``prior``, ``diffusion``,
    ``decoder`` (``discrete_elbo_terms``, ``discrete_elbo_mc_terms``,
    ``vdm_elbo_terms``); it is jitted here with ``params`` as an argument.
    Batch i gets the key ``fold_in(key, i)``. ``batches`` yields arrays
    [B, ...] or dicts with ``x`` [B, ...] and optionally ``mask`` [B] (False
    on padding, which is left out; see ``epoch_batches``); ``max_batches``
    stops early.

    With ``num_dims`` (images) every term is reported in bits/dim
    (``losses.bits_per_dim``), otherwise in nats per example. With
    ``log_prob_fn`` (toy data with an exact density) the exact NLL -log p(x)
    and the paired gap (negative ELBO - NLL, >= 0 in expectation) are
    reported too. The standard errors are those of the mean over examples
    (std / sqrt(N)); they include the Monte-Carlo noise of the bound.

    Returns {"unit", "num_examples", "method", "terms": {name: {"mean", "stderr"}}}.
    """
    if num_dims is not None and (not isinstance(num_dims, int) or num_dims < 1):
        raise ValueError(f"num_dims must be a positive integer or None, got {num_dims!r}")
    jitted = jax.jit(terms_fn)
    moments = _Moments()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, mask = _batch_x_mask(batch)
        terms = jax.device_get(jitted(params, jax.random.fold_in(key, i), x))
        if "total" not in terms:
            raise ValueError(f"terms_fn must return a dict with a 'total' entry, got keys {sorted(terms)}")
        values = {k: np.asarray(terms[k], np.float64) for k in ELBO_TERMS if k in terms}
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
        "unit": "bits/dim" if num_dims else "nats",
        "num_examples": moments.n["total"],
        "method": method,
        "terms": {k: moments.summary(k) for k in order},
    }


def format_table(result: Mapping) -> str:
    """A fixed-width table of a ``negative_elbo`` result (one row per term)."""
    unit = result["unit"]
    lines = [f"negative ELBO ({result['method'] or 'estimate'}), {result['num_examples']} examples",
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


# ---------------------------------------------------------------------------
# A small classifier whose penultimate features give a Fréchet distance.
# ---------------------------------------------------------------------------


class FeatureClassifier(nn.Module):
    """A small CNN for images [B, H, W, C] in [-1, 1]: three 3x3 conv layers (the last two
    with stride 2), global average pooling, a ``feature_dim`` ReLU layer (the features) and a
    linear classifier. Returns (logits, features)."""

    num_classes: int
    width: int = 32
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.width, (3, 3))(x))
        h = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(h))
        h = nn.relu(nn.Conv(4 * self.width, (3, 3), strides=2)(h))
        features = nn.relu(nn.Dense(self.feature_dim)(h.mean(axis=(1, 2))))
        return nn.Dense(self.num_classes)(features), features


def train_classifier(key, batch_fn: Callable, num_classes: int, image_shape, num_steps: int,
                     learning_rate: float = 1e-3) -> tuple[dict, dict]:
    """Train ``FeatureClassifier`` with Adam on cross-entropy for ``num_steps`` steps.

    ``batch_fn(step) -> (images [B, H, W, C], labels [B])``. Returns (params,
    info) with info the last 50 steps' mean training loss and accuracy.
    """
    if num_classes < 2:
        raise ValueError(f"the feature classifier needs labelled data with >= 2 classes, got num_classes={num_classes}")
    model = FeatureClassifier(num_classes)
    params = model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"]
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jnp.mean(logits.argmax(-1) == y)

    recent = []
    for i in range(num_steps):
        x, y = batch_fn(i)
        params, opt_state, loss, acc = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
        recent = (recent + [(float(loss), float(acc))])[-50:]
    info = {"train_loss": float(np.mean([r[0] for r in recent])),
            "train_accuracy": float(np.mean([r[1] for r in recent]))}
    return jax.device_get(params), info


def _save_params(path: str, params, meta: dict) -> None:
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    tmp = path + ".tmp.npz"
    np.savez(tmp, __meta__=json.dumps(meta), **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, path)  # atomic: a reader never sees a half-written cache


def _load_params(path: str) -> tuple[dict, dict]:
    with np.load(path) as f:
        meta = json.loads(str(f["__meta__"]))
        flat = {k: f[k] for k in f.files if k != "__meta__"}
    return flax.traverse_util.unflatten_dict(flat, sep="/"), meta


CLASSIFIER_FILE = "feature_classifier.npz"


def load_or_train_classifier(workdir: str, batch_fn: Callable, num_classes: int, image_shape, *,
                             num_steps: int = 1000, seed: int = 0) -> Callable:
    """The feature map ``images [N, H, W, C] -> features [N, 128]`` of a classifier trained on
    the data set, cached as ``workdir/feature_classifier.npz``.

    On first use the classifier is trained (``train_classifier``, ``num_steps``
    batches from ``batch_fn``) and its parameters saved with their image shape
    and class count; later calls load them and never touch ``batch_fn``. A
    cache made for another image shape or class count is an error (delete the
    file to retrain).
    """
    path = os.path.join(workdir, CLASSIFIER_FILE)
    meta = {"image_shape": list(image_shape), "num_classes": int(num_classes)}
    if os.path.exists(path):
        params, saved = _load_params(path)
        if {k: saved.get(k) for k in meta} != meta:
            raise ValueError(f"{path} was trained for {({k: saved.get(k) for k in meta})}, not {meta}; "
                             "delete it to retrain the feature classifier")
    else:
        params, info = train_classifier(jax.random.PRNGKey(seed), batch_fn, num_classes, image_shape,
                                        num_steps)
        os.makedirs(workdir, exist_ok=True)
        _save_params(path, params, {**meta, **info, "num_steps": num_steps})
    model = FeatureClassifier(num_classes)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])

    def features(images, batch_size: int = 500):
        images = np.asarray(images, np.float32)
        if images.shape[1:] != tuple(image_shape):
            raise ValueError(f"images must have shape [N, {', '.join(map(str, image_shape))}], got {images.shape}")
        return np.concatenate([np.asarray(apply(params, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    return features


def classifier_frechet_distance(features_fn: Callable, samples, real) -> float:
    """Fréchet distance between Gaussian fits of ``features_fn`` features of samples and of real
    images (``features_fn`` from ``load_or_train_classifier`` or ``inception_features``)."""
    return frechet_distance_of_features(features_fn(samples), features_fn(real))


# ---------------------------------------------------------------------------
# InceptionV3 pool3 features for FID (weights supplied by the user).
# ---------------------------------------------------------------------------

INCEPTION_WEIGHTS_HELP = (
    "FID needs the InceptionV3 weights of the TensorFlow FID model as ported by pytorch-fid "
    "(pt_inception-2015-12-05-6726825d.pth), converted once to an .npz of its state dict with "
    "the PyTorch parameter names as keys, e.g.\n"
    "  python -c \"import torch, numpy as np; sd = torch.load('pt_inception-2015-12-05-6726825d.pth'); "
    "np.savez('inception_fid.npz', **{k: v.numpy() for k, v in sd.items()})\"\n"
    "Nothing is downloaded at run time.")


class _BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU, as torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _conv(name, features, kernel, strides=1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return _BasicConv(features, kernel, strides, padding, name=name)


def _avg_pool_same(x):
    """3x3 stride-1 average pool without counting the zero padding (TensorFlow's, pytorch-fid)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class _InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv("branch1x1", 64, 1)(x)
        b5 = _conv("branch5x5_2", 64, 5, padding=2)(_conv("branch5x5_1", 48, 1)(x))
        b3 = _conv("branch3x3dbl_1", 64, 1)(x)
        b3 = _conv("branch3x3dbl_3", 96, 3, padding=1)(_conv("branch3x3dbl_2", 96, 3, padding=1)(b3))
        bp = _conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class _InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv("branch3x3", 384, 3, strides=2)(x)
        bd = _conv("branch3x3dbl_1", 64, 1)(x)
        bd = _conv("branch3x3dbl_3", 96, 3, strides=2)(_conv("branch3x3dbl_2", 96, 3, padding=1)(bd))
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], -1)


class _InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = _conv("branch1x1", 192, 1)(x)
        b7 = _conv("branch7x7_1", c, 1)(x)
        b7 = _conv("branch7x7_2", c, (1, 7), padding=(0, 3))(b7)
        b7 = _conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = _conv("branch7x7dbl_1", c, 1)(x)
        bd = _conv("branch7x7dbl_2", c, (7, 1), padding=(3, 0))(bd)
        bd = _conv("branch7x7dbl_3", c, (1, 7), padding=(0, 3))(bd)
        bd = _conv("branch7x7dbl_4", c, (7, 1), padding=(3, 0))(bd)
        bd = _conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = _conv("branch_pool", 192, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class _InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv("branch3x3_2", 320, 3, strides=2)(_conv("branch3x3_1", 192, 1)(x))
        b7 = _conv("branch7x7x3_1", 192, 1)(x)
        b7 = _conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = _conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = _conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], -1)


class _InceptionE(nn.Module):
    """``max_pool``: the second E block of the FID network pools by max, not average (pytorch-fid)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = _conv("branch1x1", 320, 1)(x)
        b3 = _conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([_conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              _conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
        bd = _conv("branch3x3dbl_2", 384, 3, padding=1)(_conv("branch3x3dbl_1", 448, 1)(x))
        bd = jnp.concatenate([_conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              _conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], -1)
        pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool
                  else _avg_pool_same(x))
        bp = _conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
    """The FID InceptionV3 (Szegedy et al. 2016; the TensorFlow FID graph as in pytorch-fid) up
    to pool3: images [N, H, W, C] in [-1, 1] (C = 1 is repeated to RGB) are resized bilinearly
    to 299 x 299 and mapped to 2048-d features. Submodule names follow torchvision's, so the
    weights load by name (``load_inception_variables``)."""

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = jax.image.resize(x, (x.shape[0], 299, 299, 3), "bilinear", antialias=False)
        x = _conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = _conv("Conv2d_2a_3x3", 32, 3)(x)
        x = _max_pool_valid(_conv("Conv2d_2b_3x3", 64, 3, padding=1)(x))
        x = _conv("Conv2d_3b_1x1", 80, 1)(x)
        x = _max_pool_valid(_conv("Conv2d_4a_3x3", 192, 3)(x))
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = _InceptionC(c7, name=name)(x)
        x = _InceptionD(name="Mixed_7a")(x)
        x = _InceptionE(name="Mixed_7b")(x)
        x = _InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


# Flax leaf -> (PyTorch parameter suffix, transform of the PyTorch array).
_TORCH_NAMES = {
    ("params", "conv", "kernel"): ("conv.weight", lambda w: np.transpose(w, (2, 3, 1, 0))),  # OIHW -> HWIO
    ("params", "bn", "scale"): ("bn.weight", lambda w: w),
    ("params", "bn", "bias"): ("bn.bias", lambda w: w),
    ("batch_stats", "bn", "mean"): ("bn.running_mean", lambda w: w),
    ("batch_stats", "bn", "var"): ("bn.running_var", lambda w: w),
}


@functools.lru_cache(maxsize=1)
def _inception_shapes() -> dict:
    return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3)))


def load_inception_variables(path: str) -> dict:
    """Flax variables of ``InceptionV3`` from an .npz of the pytorch-fid state dict (see
    ``INCEPTION_WEIGHTS_HELP``). Keys the network does not use (fc.*, num_batches_tracked)
    are ignored; a missing file, a missing key or a wrong shape is an error naming it."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file not found: {path!r}.\n{INCEPTION_WEIGHTS_HELP}")
    shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(_inception_shapes()))
    flat = {}
    with np.load(path) as f:
        for key, shape in shapes.items():
            collection, *modules, layer, leaf = key
            suffix, transform = _TORCH_NAMES[(collection, layer, leaf)]
            torch_name = ".".join(modules + [suffix])
            if torch_name not in f.files:
                raise ValueError(f"{path} has no array {torch_name!r}.\n{INCEPTION_WEIGHTS_HELP}")
            value = transform(np.asarray(f[torch_name], np.float32))
            if value.shape != shape.shape:
                raise ValueError(f"{path}: {torch_name!r} has shape {value.shape} after conversion, "
                                 f"expected {shape.shape}")
            flat[key] = value
    return flax.traverse_util.unflatten_dict(flat)


def inception_features(weights_path: str, batch_size: int = 100) -> Callable:
    """``images [N, H, W, C] in [-1, 1] -> pool3 features [N, 2048]`` of the FID InceptionV3
    with weights from ``weights_path`` (``load_inception_variables``)."""
    variables = load_inception_variables(weights_path)
    apply = jax.jit(lambda v, x: InceptionV3().apply(v, x))

    def features(images):
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must have shape [N, H, W, C] with C in (1, 3), got {images.shape}")
        return np.concatenate([np.asarray(apply(variables, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    return features
