"""The CPU dense layer's kernel gradient leaves training unchanged: its gradients equal XLA's, and
params after a few SGD steps of a ResBlock (with its 1x1 shortcut) and an AttnBlock (q/k/v and
output projections) in a ``lax.scan`` are the same with ``vdm.models.cpu_dense`` as with
``lax.dot_general``."""
import jax
import jax.numpy as jnp
import numpy as np

from tests.block_training import assert_params_after_steps_unchanged
from vdm.models import cpu_dense


def test_dense_gradients_equal_xla():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 6))
    w = jax.random.normal(jax.random.PRNGKey(1), (6, 9))
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 7, 9))
    y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.einsum("bhwc,co->bhwo", x, w), x, w)
    y, vjp = jax.vjp(cpu_dense.dense, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_params_after_steps_equal_with_cpu_dense_and_xla(monkeypatch):
    assert_params_after_steps_unchanged(lambda: monkeypatch.setattr(cpu_dense, "dot_general", jax.lax.dot_general))
