"""Networks: shapes, determinism and dropout, parameter counts, conditioning, the learned schedule, config checks."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdm.models import LearnedLogSNR, build_model, cpu_conv, layers, presets

KEY = jax.random.PRNGKey(0)

# Every preset, shrunk (width, depth, image size) but keeping its structure.
SMALL = {
    "ddpm_cifar10": (dict(ch=16, num_res_blocks=1, num_groups=8), (16, 16, 3)),  # attention at 16 = level 0
    "adm64_unet256": (dict(ch=16, num_res_blocks=1, num_groups=8, attn_resolutions=(8, 4, 2)), (16, 16, 3)),
    "mnist_unet128": (dict(ch=16, num_res_blocks=1, num_groups=8), (16, 16, 1)),
    "lucidrains_unet64": (dict(ch=16, num_res_blocks=1), (16, 16, 3)),  # lucidrains_unet64(16): attention at 2x2
    "vdm_cifar10": (dict(ch=16, num_blocks=2, num_groups=8, attention=True), (8, 8, 3)),
    "digits_unet": (dict(ch=16), (8, 8, 1)),
    "toy_mlp": (dict(hidden=16), (2,)),
    "step_heads_mlp128": (dict(hidden=16), (2,)),
    "mean_var_mlp4": ({}, (1,)),
}


def small_preset(name):
    config = presets.PRESETS[name](16) if name == "lucidrains_unet64" else presets.PRESETS[name]()
    overrides, data_shape = SMALL[name]
    config.update(overrides)
    return config, data_shape


def inputs(data_shape, name="", batch=4):
    x = jax.random.normal(jax.random.PRNGKey(1), (batch,) + data_shape)
    if name == "step_heads_mlp128":
        return x, jnp.array([1, 2, 39, 40])[:batch]
    return x, jax.random.uniform(jax.random.PRNGKey(2), (batch,))


def n_params(tree):
    return sum(a.size for a in jax.tree_util.tree_leaves(tree))


def random_params(model, *args, seed=0):
    """Parameters of model's structure drawn directly (GroupNorm scales 1, others N(0, 1/fan_in)).

    Cheaper than compiling model.init, whose per-parameter threefry graphs dominate the compile time
    of these small networks on CPU; the properties tested here hold for any parameter values.
    """
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(shape.shape, shape.dtype)
        fan_in = int(np.prod(shape.shape[:-1])) if len(shape.shape) > 1 else 1
        return jnp.asarray(rng.standard_normal(shape.shape) / np.sqrt(fan_in), shape.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, KEY, *args))


def rbg_key(seed):
    return jax.random.key(seed, impl="rbg")  # RngBitGenerator: far cheaper to compile than threefry


def test_presets_cover_every_network():
    assert set(SMALL) == set(presets.PRESETS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_preset_output_shape(name):
    """Output has x's shape, twice the channels with a learned variance (traced, not compiled)."""
    config, data_shape = small_preset(name)
    x, t = inputs(data_shape, name)
    for learned in ((True,) if name == "mean_var_mlp4" else (False, True)):
        model = build_model(config, data_shape, learned_variance=learned)
        out = jax.eval_shape(lambda: model.apply(model.init(KEY, x, t), x, t))
        assert out.shape == x.shape[:-1] + (x.shape[-1] * (2 if learned else 1),) and out.dtype == jnp.float32


# One preset per network class (the other UNet presets differ in widths and levels only).
@pytest.mark.parametrize("name", ["digits_unet", "vdm_cifar10", "toy_mlp", "step_heads_mlp128",
                                  "mean_var_mlp4"])
def test_preset_conditions_on_its_own_example_and_time(name):
    """A real forward pass (random parameters): example i's output depends on x_i and t_i only.
    Changing example 0's input or time changes its output and leaves the others' unchanged
    (no mixing across the batch, e.g. through a norm over the batch axis)."""
    config, data_shape = small_preset(name)
    model = build_model(config, data_shape, learned_variance=name == "mean_var_mlp4")
    x, t = inputs(data_shape, name)
    params = random_params(model, x, t)
    apply = jax.jit(lambda x, t: model.apply(params, x, t))
    out = np.asarray(apply(x, t))
    x2 = x.at[0].multiply(-0.5)
    t2 = t.at[0].set(t[3] if name == "step_heads_mlp128" else 0.9 - t[0])
    for changed in (np.asarray(apply(x2, t)), np.asarray(apply(x, t2))):
        assert np.all(np.isfinite(changed))
        assert np.abs(changed[0] - out[0]).max() > 1e-4
        np.testing.assert_allclose(changed[1:], out[1:], rtol=1e-5, atol=1e-5)


def test_ddpm_cifar10_has_35_7m_parameters():
    """Ho et al. 2020 report 35.7M parameters for their CIFAR-10 model."""
    model = build_model(presets.ddpm_cifar10(), (32, 32, 3))
    x = jnp.zeros((1, 32, 32, 3))
    count = n_params(jax.eval_shape(model.init, KEY, x, jnp.zeros((1,))))
    assert abs(count - 35.7e6) / 35.7e6 < 0.005, count


def test_adm64_unet256_has_about_half_a_billion_parameters():
    """The FSDP benchmark's large preset: 471M parameters at 64x64 (traced, not compiled)."""
    model = build_model(presets.adm64_unet256(), (64, 64, 3))
    count = n_params(jax.eval_shape(model.init, KEY, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,))))
    assert 0.45e9 < count < 0.5e9, count


# --------------------------------------------------------------------------- a small conditional UNet

DATA = (8, 8, 1)
NUM_CLASSES = 10


def small_unet(**fields):
    config = presets.digits_unet()
    config.update(ch=16, num_res_blocks=1, dropout=0.5, **fields)
    return build_model(config, DATA, learned_variance=True, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def unet():
    """A small class-conditional UNet with dropout, random parameters, and its jitted apply."""
    model = small_unet()
    x, t = inputs(DATA)
    params = random_params(model, x, t, jnp.zeros((4,), jnp.int32))
    return model, params, jax.jit(model.apply, static_argnames="train"), x, t


def test_zero_initialised_output_layer():
    """zero_init_output: the output layer starts at exactly 0 whatever its input (so does the network)."""
    h = jax.random.normal(KEY, (2, 4, 4, 16))
    for zero_init in (True, False):
        head = layers.OutputHead(3, num_groups=8, zero_init=zero_init)
        out = head.apply(head.init(rbg_key(0), h), h)
        assert out.shape == (2, 4, 4, 3) and np.array_equal(out, np.zeros_like(out)) == zero_init


def test_dropout_only_with_train_and_rng(unet):
    model, params, apply, x, t = unet
    y = jnp.arange(4)
    k1, k2 = rbg_key(1), rbg_key(2)
    eval_out = apply(params, x, t, y)
    assert np.all(np.isfinite(eval_out)) and np.array_equal(eval_out, apply(params, x, t, y))  # deterministic
    assert np.array_equal(eval_out, apply(params, x, t, y, rngs={"dropout": k1}))  # rng ignored without train
    train1 = apply(params, x, t, y, train=True, rngs={"dropout": k1})
    assert np.array_equal(train1, apply(params, x, t, y, train=True, rngs={"dropout": k1}))
    assert not np.allclose(train1, apply(params, x, t, y, train=True, rngs={"dropout": k2}))
    assert not np.allclose(train1, eval_out)
    with pytest.raises(flax.errors.InvalidRngError):
        apply(params, x, t, y, train=True)


def test_output_changes_with_neighbouring_t(unet):
    _, params, apply, x, t = unet
    y = jnp.arange(4)
    step = 1.0 / 1000  # neighbouring steps of a T = 1000 chain
    diff = np.abs(apply(params, x, t + step, y) - apply(params, x, t, y)).max(axis=(1, 2, 3))
    assert np.all(diff > 1e-3), diff


def test_output_changes_with_label_and_null_label(unet):
    _, params, apply, x, t = unet
    outs = [apply(params, x, t, jnp.full((4,), c, jnp.int32)) for c in (3, 4, NUM_CLASSES)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(outs[a] - outs[b]).max(axis=(1, 2, 3)).min() > 1e-3
    # cond=None is the null class: the same values up to float rounding (two programs, compiled apart)
    np.testing.assert_allclose(apply(params, x, t, None), outs[2], rtol=1e-5, atol=1e-6)


def test_time_embedding_separates_neighbouring_t():
    """Step k -> k+1 moves the frequency-1 (sin, cos) pair by 2 sin(1/2); all 1001 steps stay apart."""
    for time_range, values in [((0.0, 1.0), jnp.linspace(0.0, 1.0, 1001)),
                               ((13.3, -5.0), jnp.linspace(13.3, -5.0, 1001))]:  # VDM's normalised log-SNR
        emb = np.asarray(layers.sinusoidal_embedding(layers.normalise_time(values, time_range) * 1000, 128))
        sq = (emb ** 2).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * emb @ emb.T, 0.0))
        assert np.diag(dist, 1).min() >= 2 * np.sin(0.5) - 1e-3
        assert (dist + 10 * np.eye(len(emb))).min() > 0.5


def test_vdm_net_input_skip_and_log_snr_conditioning():
    """With its output layer at zero the VDM net returns exactly its input (the base-measure skip);
    otherwise its output moves between neighbouring log-SNRs."""
    config, data_shape = small_preset("vdm_cifar10")
    model = build_model(config, data_shape)
    x, _ = inputs(data_shape)
    log_snr = jnp.linspace(-4.0, 12.0, 4)
    params = random_params(model, x, log_snr)
    apply = jax.jit(model.apply)
    diff = np.abs(apply(params, x, log_snr + 18.3 / 1000) - apply(params, x, log_snr))
    assert np.all(diff.max(axis=(1, 2, 3)) > 1e-3), diff.max(axis=(1, 2, 3))
    zero_out = jax.tree_util.tree_map_with_path(
        lambda path, p: 0 * p if "OutputHead_0']['Conv_0" in jax.tree_util.keystr(path) else p, params)
    assert np.array_equal(apply(zero_out, x, log_snr), x)


@pytest.mark.parametrize("stride,size,channels,kernel", [(1, 7, (3, 5), (3, 3)), (2, 8, (4, 6), (3, 3)),
                                                        (2, 7, (2, 3), (3, 3)), (1, 6, (3, 4), (5, 2)),
                                                        (2, 9, (3, 4), (5, 2))])
def test_conv_nhwc_gradients_equal_xla(stride, size, channels, kernel):
    """The CPU convolution's hand-written gradients (flipped-kernel conv, one matmul per kernel tap) = XLA's own."""
    ci, co = channels
    x = jax.random.normal(jax.random.PRNGKey(3), (2, size, size + 1, ci))
    w = jax.random.normal(jax.random.PRNGKey(4), kernel + (ci, co))
    pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel, (stride, stride), "SAME")
    xla = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: cpu_conv.conv_nhwc(x, w, (stride, stride), tuple(tuple(p) for p in pads))
    cotangent = jax.random.normal(jax.random.PRNGKey(5), xla(x, w).shape)
    y_ref, vjp_ref = jax.vjp(xla, x, w)
    y, vjp = jax.vjp(ours, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_float32_params(unet):
    """bfloat16 compute keeps float32 parameters and output, close to the float32 network."""
    _, params, apply, x, t = unet
    bf16 = small_unet(dtype="bfloat16")
    assert {a.dtype for a in jax.tree_util.tree_leaves(jax.eval_shape(bf16.init, KEY, x, t))} == {
        jnp.dtype(jnp.float32)}
    ref, low = apply(params, x, t), jax.jit(bf16.apply)(params, x, t)
    assert low.dtype == jnp.float32
    assert np.linalg.norm(low - ref) / np.linalg.norm(ref) < 0.05


# --------------------------------------------------------------------------- toy networks


def test_mlp_conditioning_on_t_and_label():
    model = build_model(presets.toy_mlp(), (2,), num_classes=3)
    x, t = inputs((2,))
    params = random_params(model, x, t)
    apply = jax.jit(model.apply)
    outs = [apply(params, x, t, jnp.full((4,), c)) for c in range(4)]  # label 3 is the null class
    assert all(np.abs(outs[a] - outs[b]).max(axis=1).min() > 1e-3 for a in range(4) for b in range(a))
    assert np.array_equal(apply(params, x, t), outs[3])
    assert np.abs(apply(params, x, t + 1e-3, jnp.full((4,), 0)) - outs[0]).max(axis=1).min() > 1e-3


def test_per_step_heads_use_head_t_minus_1():
    """Changing head k's weights changes exactly the outputs of the examples with t = k + 1."""
    model = build_model(presets.step_heads_mlp128(), (2,), learned_variance=True)
    x, t = inputs((2,), "step_heads_mlp128")  # t = 1, 2, 39, 40
    params = random_params(model, x, t)
    apply = jax.jit(model.apply)
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, p: p.at[38].add(1.0) if "head" in jax.tree_util.keystr(path) else p, params)
    changed = np.abs(apply(bumped, x, t) - apply(params, x, t)).max(axis=1) > 0
    assert changed.tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="int32 timestep"):
        model.apply(params, x, t.astype(jnp.float32))


def test_mean_var_nets_are_separate():
    model = build_model(presets.mean_var_mlp4(), (1,), learned_variance=True)
    x, t = inputs((1,))
    params = jax.jit(model.init)(KEY, x, t)
    apply = jax.jit(model.apply)
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 1.0 if "var_" in jax.tree_util.keystr(path) else p, params)
    before, after = apply(params, x, t), apply(bumped, x, t)
    assert np.array_equal(before[:, :1], after[:, :1]) and not np.allclose(before[:, 1:], after[:, 1:])


# --------------------------------------------------------------------------- learned schedule

GRID = jnp.linspace(0.0, 1.0, 2001)


@functools.partial(jax.jit, static_argnums=0)
def values_and_slopes(schedule, params):
    """log_snr on GRID and its t-derivative (what the continuous-time VDM loss uses)."""
    f = lambda t: schedule.apply(params, t)
    return f(GRID), jax.vmap(jax.grad(f))(GRID), f(jnp.array([0.0, 1.0]))


def assert_strictly_decreasing(schedule, params):
    values, slopes, ends = values_and_slopes(schedule, params)
    assert np.all(np.diff(np.asarray(values)) < 0) and np.all(slopes < 0)
    return np.asarray(ends)


def test_learned_schedule_monotone_at_random_initialisations():
    schedule = LearnedLogSNR(log_snr_max=13.3, log_snr_min=-5.0)
    init = jax.jit(schedule.init)
    for seed in range(3):
        key, wild_key = jax.random.split(jax.random.PRNGKey(seed))
        params = init(key, GRID)
        np.testing.assert_allclose(assert_strictly_decreasing(schedule, params), [13.3, -5.0], atol=1e-5)
        # Weights of any sign and scale: monotone by construction, not by the initialiser.
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(wild_key, len(leaves))
        wild = treedef.unflatten([5.0 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
        np.testing.assert_allclose(assert_strictly_decreasing(schedule, wild), [13.3, -5.0], atol=1e-5)


def test_learned_schedule_after_gradient_steps():
    """Fit a non-monotone target: the schedule stays strictly decreasing; fixed endpoints stay put;
    learned ones move and fit better."""
    start = np.array([10.0, -6.0])
    t = jnp.linspace(0.0, 1.0, 64)
    target = 4.0 - 12.0 * t + 6.0 * jnp.sin(2 * jnp.pi * t)  # rises, falls, rises: not monotone
    opt = optax.adam(0.05)
    final_loss = {}
    for learn_endpoints in (False, True):
        schedule = LearnedLogSNR(log_snr_max=10.0, log_snr_min=-6.0, hidden=256, learn_endpoints=learn_endpoints)
        loss_fn = lambda params: jnp.mean((schedule.apply(params, t) - target) ** 2)

        def step(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(params, updates), state), loss

        params = schedule.init(KEY, t)
        (params, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, length=150))(params)
        assert losses[-1] < 0.5 * losses[0]  # it did learn
        ends = assert_strictly_decreasing(schedule, params)
        final_loss[learn_endpoints] = losses[-1]
        if learn_endpoints:
            assert np.all(np.abs(ends - start) > 0.5), ends
        else:
            np.testing.assert_allclose(ends, start, atol=1e-5)
    assert final_loss[True] < final_loss[False]


def test_learned_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="log_snr_max"):
        LearnedLogSNR(log_snr_max=-5.0, log_snr_min=3.0)
    with pytest.raises(ValueError, match="hidden"):
        LearnedLogSNR(hidden=0)


# --------------------------------------------------------------------------- config checks


def _with(preset, **fields):
    config = preset()
    config.update(fields)
    return config


_unet = functools.partial(_with, presets.ddpm_cifar10)


BAD = [
    (_unet(ch_mult=()), (32, 32, 3), {}, "model.ch_mult"),
    (_unet(attn_resolutions=(16, 3)), (32, 32, 3), {}, "model.attn_resolutions"),
    (_unet(), (36, 36, 3), {}, "model.ch_mult.*divisible by 8"),
    (_unet(num_groups=24), (32, 32, 3), {}, "model.num_groups"),
    (_unet(num_heads=3), (32, 32, 3), {}, "model.num_heads"),
    (_unet(dropout=1.5), (32, 32, 3), {}, "model.dropout"),
    (_unet(dtype="float16"), (32, 32, 3), {}, "model.dtype"),
    (_unet(time_range=(1.0, 1.0)), (32, 32, 3), {}, "model.time_range"),
    (_unet(), (32, 3), {}, "model.name"),
    (_unet(channels=64), (32, 32, 3), {}, "model.channels"),
    (_unet(learned_variance=True), (32, 32, 3), {}, "model.learned_variance"),
    (_unet(name="resnet"), (32, 32, 3), {}, "model.name"),
    (_with(presets.vdm_cifar10, num_groups=12), (32, 32, 3), {}, "model.num_groups"),
    (presets.toy_mlp(), (8, 8, 1), {}, "model.name"),
    (presets.mean_var_mlp4(), (1,), {"learned_variance": False}, "learned variance"),
    (presets.step_heads_mlp128(), (2,), {"num_classes": 10}, "model.num_classes"),
]


@pytest.mark.parametrize("config,data_shape,kwargs,message", BAD)
def test_bad_settings_raise_at_construction(config, data_shape, kwargs, message):
    """build_model only constructs and checks the module: the error comes before any trace or compile."""
    with pytest.raises(ValueError, match=message):
        build_model(config, data_shape, **kwargs)
