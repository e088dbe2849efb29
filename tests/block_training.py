"""Params after a few SGD steps of a ResBlock and an AttnBlock: how the tests show that a layer
written for CPU speed leaves training unchanged against the reference it replaces."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm.models import layers


class Blocks(nn.Module):
    """A ResBlock from 8 to 16 channels (its 1x1 shortcut, two GroupNorms) and an AttnBlock."""
    @nn.compact
    def __call__(self, x, emb):
        return layers.AttnBlock(num_groups=4)(layers.ResBlock(16, num_groups=4)(x, emb))


def _train(params, xs, ys, emb):
    """4 SGD steps in one jitted scan, traced afresh on each call (so it sees a patched layer).

    SGD, not Adam: the key bias's gradient is zero in exact arithmetic (softmax ignores a constant
    added to every logit of a row), and Adam would scale its rounding noise up to the step size."""
    net, opt = Blocks(), optax.sgd(0.1, momentum=0.9)

    def step(carry, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((net.apply(p, batch[0], emb) - batch[1]) ** 2))(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.jit(lambda params: jax.lax.scan(step, (params, opt.init(params)), (xs, ys)))(params)
    return params, losses


def assert_params_after_steps_unchanged(use_reference):
    """Trains 4 steps on one batch of 2 (so the loss must fall), calls ``use_reference()`` (which
    patches in the reference layer), trains again from the same params and asserts equal losses
    and params, every param tensor having moved."""
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    xs = jnp.broadcast_to(jax.random.normal(keys[0], (2, 6, 6, 8)), (4, 2, 6, 6, 8))
    ys = jnp.broadcast_to(jax.random.normal(keys[1], (2, 6, 6, 16)), (4, 2, 6, 6, 16))
    emb = jax.random.normal(keys[2], (2, 32))
    params = Blocks().init(jax.random.PRNGKey(4), xs[0], emb)
    ours, losses = _train(params, xs, ys, emb)
    use_reference()
    ref, ref_losses = _train(params, xs, ys, emb)
    assert losses[-1] < losses[0]  # the steps train
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    moved = jax.tree.map(lambda a, p: np.abs(np.asarray(a) - np.asarray(p)).max(), ours, params)
    assert min(jax.tree.leaves(moved)) > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, ref)
