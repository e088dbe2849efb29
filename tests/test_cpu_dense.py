"""The CPU dense layer's kernel gradient leaves training unchanged: its gradients equal XLA's, and
params after a few SGD steps of a ResBlock (with its 1x1 shortcut) and an AttnBlock (q/k/v and
output projections) in a ``lax.scan`` are the same with ``vdm.models.cpu_dense`` as with
``lax.dot_general``."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm.models import cpu_dense, layers


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


class _Blocks(nn.Module):
    @nn.compact
    def __call__(self, x, emb):
        return layers.AttnBlock(num_groups=4)(layers.ResBlock(16, num_groups=4)(x, emb))


def _train(params, xs, ys, emb):
    """4 SGD steps in one jitted scan, traced afresh on each call (so it sees the patched layer).

    SGD, not Adam: the key bias's gradient is zero in exact arithmetic (softmax ignores a constant
    added to every logit of a row), and Adam would scale its rounding noise up to the step size."""
    net, opt = _Blocks(), optax.sgd(0.1, momentum=0.9)

    def step(carry, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((net.apply(p, batch[0], emb) - batch[1]) ** 2))(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    run = jax.jit(lambda params: jax.lax.scan(step, (params, opt.init(params)), (xs, ys)))
    (params, _), losses = run(params)
    return params, losses


def test_params_after_steps_equal_with_cpu_dense_and_xla(monkeypatch):
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    # 4 steps on one batch of 2 (so the loss must fall), 8 -> 16 channels (the shortcut)
    xs = jnp.broadcast_to(jax.random.normal(keys[0], (2, 6, 6, 8)), (4, 2, 6, 6, 8))
    ys = jnp.broadcast_to(jax.random.normal(keys[1], (2, 6, 6, 16)), (4, 2, 6, 6, 16))
    emb = jax.random.normal(keys[2], (2, 32))
    params = _Blocks().init(jax.random.PRNGKey(4), xs[0], emb)
    ours, losses = _train(params, xs, ys, emb)
    monkeypatch.setattr(cpu_dense, "dot_general", jax.lax.dot_general)
    ref, ref_losses = _train(params, xs, ys, emb)
    assert losses[-1] < losses[0]  # the steps train
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    moved = jax.tree.map(lambda a, p: np.abs(np.asarray(a) - np.asarray(p)).max(), ours, params)
    assert min(jax.tree.leaves(moved)) > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, ref)
