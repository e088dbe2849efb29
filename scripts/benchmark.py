"""Speed benchmark: machine limits, UNet training, samplers and the exact ELBO.

One process, one run. Every figure is timed over ``--repeats`` calls of an
ahead-of-time compiled function after one warm-up call, and reported as
min/median/max; compile time is measured separately (``lower`` + ``compile``).
Figures that are compared as ratios are timed in interleaved rounds (one call
of each in turn, ``--repeats`` times): the limits with the training runs, each
size's forward with its samplers, the ELBO with the forward at its batch.

FLOPs are counted from the jaxpr of the timed function: every ``dot_general``
and ``conv_general_dilated`` it executes (attention is einsums, i.e.
dot_generals), at 2 FLOPs per multiply-add, backward passes included as they
are traced, ``scan`` bodies times their length. Elementwise work (norms,
activations, the optimiser) is not counted. XLA's own estimate
(``compiled.cost_analysis()['flops']``, which also counts elementwise ops) is
reported beside it. Peak memory is XLA's plan for the compiled executable
(arguments + outputs + temporaries - donated aliases, from
``compiled.memory_analysis()``), plus the allocator's peak where the device
reports one (GPU).

Usage (CPU here, unchanged on a GPU):

    python scripts/benchmark.py --json benchmark.json
    python scripts/benchmark.py --dtype bfloat16 --train-batch 128 --json gpu.json  # on a GPU
    python scripts/benchmark.py --only input,overlap --json input.json  # the data loader

``input`` times ``Dataset.get_batch`` per source at 1, 2 and 4 decoding threads;
``overlap`` runs the real training loop with a fake 50 ms step on a 128 px JPEG folder,
with and without prefetching, beside the step alone.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SECTIONS = ("limits", "train", "sample", "elbo", "input", "overlap", "memory")
# overlap runs the training loop twice and memory compiles a 471M-parameter UNet: asked for by name
DEFAULT_SECTIONS = SECTIONS[:5]
DTYPES = ("float32", "bfloat16")

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, keyed by
# a substring of ``device.device_kind``; used for model FLOPs utilisation.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                    "V100": 125.0, "T4": 65.0, "RTX 4090": 165.0}


# ---------------------------------------------------------------------------
# Device, FLOPs, memory, timing.
# ---------------------------------------------------------------------------


def device_info() -> dict:
    """What ran the benchmark: backend, device kind and count, versions, host CPU."""
    dev = jax.devices()[0]
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "host_cpu": cpu, "host_cores": os.cpu_count(),
            "jax": jax.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def peak_tflops(info: dict, dtype: str) -> float | None:
    """The device's dense peak for ``dtype`` where known (GPUs, bf16), else None."""
    if info["backend"] != "gpu" or dtype != "bfloat16":
        return None
    for name, tflops in BF16_PEAK_TFLOPS.items():
        if name in info["device_kind"]:
            return tflops
    return None


def _sub_jaxprs(value) -> list:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _eqn_flops(eqn) -> int:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs_shape = eqn.invars[0].aval.shape
        return 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs_shape[d] for d in lhs_contract]))
    if name == "conv_general_dilated":
        # Every output element sums (kernel window) x (input features per group) products;
        # this also holds for the weight-gradient convolutions (batch_group_count > 1).
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec
        rhs_shape = eqn.invars[1].aval.shape
        window = int(np.prod([rhs_shape[d] for d in rhs_spec[2:]]))
        return 2 * int(np.prod(eqn.outvars[0].aval.shape)) * window * rhs_shape[rhs_spec[1]]
    return 0


def jaxpr_flops(jaxpr) -> int:
    """Matmul/conv FLOPs (2 per multiply-add) executed by a jaxpr, sub-jaxprs included.

    ``scan`` bodies count ``length`` times, ``cond`` counts its costliest branch,
    ``pmap`` bodies count once per device. A ``while`` loop has no static trip
    count and is refused.
    """
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "while":
            raise ValueError("jaxpr_flops: a while loop has no static trip count; use lax.scan")
        subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if name == "cond":
            total += max(jaxpr_flops(j) for j in subs)
            continue
        inner = sum(jaxpr_flops(j) for j in subs)
        if name == "scan":
            inner *= eqn.params["length"]
        elif name == "xla_pmap":
            inner *= eqn.params["axis_size"]
        elif name == "shard_map":  # jax.pmap lowers to shard_map: the body runs once per device
            mesh = eqn.params["mesh"]
            inner *= int(np.prod([mesh.shape[a] for a in eqn.params["newly_manual_axes"]]))
        total += inner + _eqn_flops(eqn)
    return total


def count_flops(fn: Callable, *args) -> int:
    """Matmul/conv FLOPs of one call ``fn(*args)``, counted from its jaxpr."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def compiled_stats(compiled) -> dict:
    """XLA's FLOP estimate and planned peak bytes of a compiled executable."""
    out = {"xla_flops": None, "xla_peak_bytes": None}
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        out["xla_flops"] = float(cost["flops"])
    mem = compiled.memory_analysis()
    if mem is not None:
        out["xla_peak_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                    + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    return out


def device_peak_bytes() -> int | None:
    """The allocator's peak bytes in use so far on device 0 (GPU/TPU), None where not reported."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def summary(values: Sequence[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class Timer:
    """``fn`` compiled ahead of time (the compile time kept) and run once to warm up;
    ``time_call()`` times one more call, ``result()`` summarises them.

    With ``carry`` the function returns ``(new_first_arg, extra)`` and the first
    argument is threaded through the calls (a train state, possibly donated).
    A function faster than ``REWARM_BELOW_S`` gets one untimed call before each timed
    one, so that in interleaved rounds it is not timed with the caches another,
    longer function left behind.
    """

    REWARM_BELOW_S = 1.0

    def __init__(self, fn: Callable, *args, carry: bool = False):
        self.flops = count_flops(fn, *args)
        print(f"  compiling {getattr(fn, '__name__', 'function')} ...", file=sys.stderr, flush=True)
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
        start = time.perf_counter()
        self.compiled = jitted.lower(*args).compile()
        self.compile_s = time.perf_counter() - start
        self.args, self.carry, self.times = list(args), carry, []
        start = time.perf_counter()
        self._call()
        self.rewarm = time.perf_counter() - start < self.REWARM_BELOW_S

    def _call(self):
        out = self.compiled(*self.args)
        jax.block_until_ready(out)
        if self.carry:
            self.args[0] = out[0]

    def time_call(self):
        if self.rewarm:
            self._call()
        start = time.perf_counter()
        self._call()
        self.times.append(time.perf_counter() - start)

    def result(self) -> dict:
        """Compile seconds, per-call seconds (min/median/max), matmul/conv FLOPs per call,
        XLA's FLOP estimate and peak bytes."""
        return {"compile_s": self.compile_s, "seconds": summary(self.times), "flops": self.flops,
                **compiled_stats(self.compiled), "device_peak_bytes": device_peak_bytes()}


class Pending(NamedTuple):
    """A benchmark's timers and the function that turns their timings into its result."""

    timers: list
    finish: Callable[[], dict]


def run_interleaved(pending: dict, repeats: int) -> dict:
    """Time ``repeats`` rounds, each one call of every timer of every benchmark in turn, so
    that figures compared as ratios share the machine's load; then finish each benchmark."""
    timers = [t for p in pending.values() for t in p.timers]
    print(f"  timing {len(timers)} functions x {repeats} rounds ...", file=sys.stderr, flush=True)
    for _ in range(repeats):
        for t in timers:
            t.time_call()
    return {name: p.finish() for name, p in pending.items()}


def rate(result: dict, amount: float) -> dict:
    """``amount`` per second for each of min/median/max time (the fastest call gives the max rate)."""
    s = result["seconds"]
    return {"min": amount / s["max"], "median": amount / s["median"], "max": amount / s["min"]}


# ---------------------------------------------------------------------------
# Machine limits.
# ---------------------------------------------------------------------------


def conv3x3(x, w):
    """A 3x3 'SAME' convolution, NHWC input and HWIO kernel."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def with_gflops(timer: Timer, **extra) -> Callable[[], dict]:
    def finish():
        r = timer.result()
        return {**r, "gflops": rate(r, r["flops"] / 1e9), **extra}
    return finish


def bench_matmul(n: int, dtype: str) -> Pending:
    """[n, n] @ [n, n] in ``dtype`` (float32 accumulation where the backend does it)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    timer = Timer(jnp.matmul, a, b)
    return Pending([timer], with_gflops(timer, shape=[n, n, n]))


def bench_conv(batch: int, size: int, channels: int, dtype: str) -> Pending:
    """3x3 conv forward + backward (input and kernel gradients) through XLA's own gradients and
    through the UNet's ``vdm.models.cpu_conv.conv_nhwc``, and each of XLA's three passes alone."""
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, size, size, channels), dtype)
    w = (jax.random.normal(kw, (3, 3, channels, channels)) / np.sqrt(9 * channels)).astype(dtype)
    dy = jax.random.normal(ky, x.shape, dtype)

    def fwd_bwd(conv):
        def run(x, w, dy):
            y, vjp = jax.vjp(conv, x, w)
            return y, vjp(dy)
        return run

    from vdm.models import cpu_conv

    unet_conv = lambda x, w: cpu_conv.conv_nhwc(x, w, (1, 1), ((1, 1), (1, 1)))
    passes = {"forward+backward": fwd_bwd(conv3x3), "forward+backward unet": fwd_bwd(unet_conv),
              "forward": lambda x, w, dy: conv3x3(x, w),
              "backward_input": lambda x, w, dy: jax.linear_transpose(lambda x: conv3x3(x, w), x)(dy),
              "backward_kernel": lambda x, w, dy: jax.linear_transpose(lambda w: conv3x3(x, w), w)(dy)}
    timers = {name: Timer(fn, x, w, dy) for name, fn in passes.items()}
    return Pending(list(timers.values()), lambda: {"shape": [batch, size, size, channels],
                                                   **{n: with_gflops(t)() for n, t in timers.items()}})


# ---------------------------------------------------------------------------
# The UNet: one config, the real train step, samplers and the exact ELBO.
# ---------------------------------------------------------------------------

# name -> (ch, ch_mult, training batch); the rest is Ho et al.'s CIFAR-10 UNet (2 blocks per
# level, attention at 16x16, dropout 0.1), T = 1000 linear schedule, eps prediction. ``ddpm`` is
# that UNet at full width (35.7M parameters, batch 128: the GPU figure); small and base are the
# CPU sizes run by default.
UNET_SIZES = {"small": (32, (1, 2, 2), 32), "base": (64, (1, 2, 2, 2), 16), "ddpm": (128, (1, 2, 2, 2), 128)}
DEFAULT_SIZES = ("small", "base")
IMAGE_SHAPE = (32, 32, 3)


def unet_config(ch: int, ch_mult, batch: int, dtype: str, steps_per_call: int = 1, attn_resolutions=(16,),
                T: int = 1000):
    """The default run's config (configs/digits.py) with Ho et al.'s UNet at width ``ch``."""
    import importlib.util

    from vdm.models import presets

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.py")
    spec = importlib.util.spec_from_file_location("digits_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model = presets.ddpm_cifar10()
    config.model.ch, config.model.ch_mult, config.model.dtype = ch, tuple(ch_mult), dtype
    config.model.attn_resolutions = tuple(attn_resolutions)
    config.diffusion.schedule, config.diffusion.T = "linear", T
    config.train.batch_size, config.train.steps_per_call = batch, steps_per_call
    return config


class UNetBench:
    """The pieces of the real training code for one UNet: network, objective, optimiser, params."""

    def __init__(self, ch: int, ch_mult, batch: int, dtype: str = "float32", steps_per_call: int = 1,
                 image_shape=IMAGE_SHAPE, attn_resolutions=(16,), T: int = 1000):
        import types

        from vdm import build
        from vdm import train_step

        self.train_lib, self.batch, self.k, self.image_shape = train_step, batch, steps_per_call, tuple(image_shape)
        self.config = unet_config(ch, ch_mult, batch, dtype, steps_per_call, attn_resolutions, T)
        data = types.SimpleNamespace(data_shape=self.image_shape, is_discrete_8bit=True)
        self.setup = build.build_setup(self.config, data)
        self.params = self.setup.init_params(jax.random.PRNGKey(0))
        self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.params["net"]))
        self.process = self.setup.process

    def model_fn(self, params):
        """The network as the losses' and samplers' ``model_fn(x_t, t)``."""
        from vdm import build

        return build.make_model_fn(self.setup.network, self.process,
                                  self.config.diffusion.time_input, params)

    def train_args(self):
        """(pmapped multi-step train function, replicated state, batches) as the training loop uses them."""
        from vdm import parallel

        tl, optim = self.train_lib, self.config.optim
        optimizer = tl.make_optimizer(optim, self.config.train.num_steps)
        state = tl.TrainState(step=jnp.int32(0), params=self.params, ema_params=self.params,
                              opt_state=optimizer.init(self.params), rng=jax.random.PRNGKey(1),
                              loss_state=self.setup.objective.init_loss_state())
        n = jax.local_device_count()
        if self.batch % n:
            raise ValueError(f"--train-batch {self.batch} must be divisible by the {n} local devices")
        x = jax.random.uniform(jax.random.PRNGKey(2), (n, self.k, self.batch // n) + self.image_shape,
                               minval=-1.0, maxval=1.0)
        p_train = tl.make_p_train(self.setup.objective, optimizer, optim)
        return p_train, parallel.replicate(state), {"x": x}

    def diffusion_kwargs(self):
        d = self.config.diffusion
        return dict(schedule=self.process.schedule, parameterization=d.parameterization,
                    variance_type=d.variance)


def bench_train(ub: UNetBench) -> Pending:
    """Images/s and matmul/conv GFLOP/s of the real pmapped train step (``steps_per_call`` steps per call)."""
    p_train, state, batches = ub.train_args()
    timer = Timer(p_train, state, batches, carry=True)
    images = ub.batch * ub.k

    def finish():
        r = timer.result()
        return {**r, "images_per_s": rate(r, images), "gflops": rate(r, r["flops"] / 1e9),
                "gflop_per_image": r["flops"] / images / 1e9, "batch": ub.batch, "steps_per_call": ub.k,
                "num_params": ub.num_params}
    return Pending([timer], finish)


def train_batch(args, size: str) -> int:
    """The training batch of a UNet size: ``--train-batch``, or the size's own."""
    return args.train_batch or UNET_SIZES[size][2]


def sample_devices(batch: int) -> int:
    """The local device count, which ``--sample-batch`` must divide: the sampler and the forward
    it is compared with split their batch over every local device."""
    n = jax.local_device_count()
    if batch % n:
        raise ValueError(f"--sample-batch {batch} must be divisible by the {n} local devices")
    return n


def bench_forward(ub: UNetBench, batch: int, devices: int = 1) -> Pending:
    """One jitted network forward at ``batch``, split over ``devices`` local devices (pmap)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (batch,) + ub.image_shape)
    t = jnp.full((batch,), ub.process.T // 2, jnp.int32)

    def forward(params, x, t):
        if devices == 1:
            return ub.model_fn(params)(x, t)
        split = lambda a: a.reshape((devices, batch // devices) + a.shape[1:])
        out = jax.pmap(lambda p, x, t: ub.model_fn(p)(x, t), in_axes=(None, 0, 0))(params, split(x), split(t))
        return out.reshape(x.shape)

    timer = Timer(forward, ub.params, x, t)
    return Pending([timer], with_gflops(timer, batch=batch))


def bench_sampler(ub: UNetBench, sampler: str, batch: int, steps: int, compile_steps: int) -> Pending:
    """Runs of ``samplers.sample`` (one lax.scan) with ``steps`` and ``2 * steps`` steps: the
    seconds per step are the difference of the two over ``steps``, round by round (the cost
    of a step inside the loop, without the fixed cost of a call); and the compile time of
    the same sampler with ``compile_steps`` steps (compiled, not run). With several local
    devices the batch is split over them (``samplers.sample(..., pmap=True)``), as
    scripts/sample.py does."""
    from vdm import samplers

    spread = sample_devices(batch) > 1

    def run(num_steps):
        return lambda params, key: samplers.sample(ub.model_fn(params), key, (batch,) + ub.image_shape,
                                                   sampler=sampler, num_steps=num_steps, pmap=spread,
                                                   **ub.diffusion_kwargs())

    key = jax.random.PRNGKey(4)
    short, long = Timer(run(steps), ub.params, key), Timer(run(2 * steps), ub.params, key)
    start = time.perf_counter()
    jax.jit(run(compile_steps)).lower(ub.params, key).compile()
    long_compile = time.perf_counter() - start

    def finish():
        r = short.result()
        per_step = summary([(b - a) / steps for a, b in zip(short.times, long.times)])
        return {**r, "steps": steps, "step_seconds": per_step, "seconds_double": summary(long.times),
                "compile_steps": compile_steps,
                "compile_s_long": long_compile, "batch": batch}
    return Pending([short, long], finish)


def bench_elbo(ub: UNetBench, batch: int, chunk: int) -> Pending:
    """``losses.discrete_elbo`` (all T terms, ``chunk`` timesteps per network call): images/s."""
    from vdm import losses

    x0 = jax.random.uniform(jax.random.PRNGKey(5), (batch,) + ub.image_shape, minval=-1.0, maxval=1.0)
    x0 = jnp.round((x0 + 1) * 127.5) / 127.5 - 1  # on the 8-bit grid, as the decoder expects
    d = ub.config.diffusion

    def elbo(params, key, x0):
        return losses.discrete_elbo(ub.model_fn(params), key, x0, ub.process.schedule,
                                    parameterization=d.parameterization, variance_type=d.variance,
                                    chunk=chunk)["total"]

    timer = Timer(elbo, ub.params, jax.random.PRNGKey(6), x0)

    def finish():
        r = timer.result()
        return {**r, "images_per_s": rate(r, batch), "gflops": rate(r, r["flops"] / 1e9), "batch": batch,
                "chunk": chunk, "T": ub.process.T}
    return Pending([timer], finish)


# ---------------------------------------------------------------------------
# The input pipeline, and its overlap with the train step.
# ---------------------------------------------------------------------------


def make_jpeg_folder(root: str, count: int = 256, size: int = 128) -> str:
    """``count`` photo-like ``size`` x ``size`` JPEGs (quality 95) in ``root``: smooth colour
    fields upsampled (bicubic) from an 8x coarser random grid plus pixel noise of s.d. 20 levels,
    so they decode like photographs rather than like flat or pure-noise images."""
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = np.clip(rng.normal(size=(size // 8, size // 8, 3)) * 60 + 128, 0, 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
        image = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, f"{i:05d}.jpg"), quality=95)
    return root


def input_sources(jpeg_folder: str) -> dict:
    """name -> (data config fields, global batch, context the source needs): the digits, a TFDS
    mock with CelebA's real image shape (218x178x3, fitted to 64), the JPEG folder at 128 px."""
    import contextlib

    import tensorflow_datasets as tfds

    return {
        "digits 8x8": (dict(source="digits", random_flip=True), 128, contextlib.nullcontext),
        "tfds celeb_a mock 218x178 -> 64": (dict(source="tfds", name="celeb_a", image_size=64, random_flip=True),
                                            32, lambda: tfds.testing.mock_data(num_examples=1024)),
        "jpeg folder 128 px": (dict(source="folder", path=jpeg_folder, image_size=128, random_flip=True,
                                    num_test=16), 32, contextlib.nullcontext),
    }


def build_input(fields: dict, batch: int, workers: int):
    from vdm import data

    cfg = data.default_config()
    cfg.update({**fields, "workers": workers})
    return data.build_dataset(cfg, split="train", global_batch_size=batch, seed=0, process_index=0,
                              process_count=1, local_device_count=1)


def bench_input(jpeg_folder: str, workers: Sequence[int], batches: int, repeats: int) -> dict:
    """Images/s of ``Dataset.get_batch`` per source and number of decoding threads
    (``data.workers``). A timed call makes ``batches`` consecutive batches; the worker counts of
    a source are timed in interleaved rounds after one warm-up batch each (threads started, files
    in the page cache), and the speed-up over one worker is taken round by round."""
    results = {}
    for name, (fields, batch, context) in input_sources(jpeg_folder).items():
        print(f"  input: {name} ...", file=sys.stderr, flush=True)
        with context():
            sets = {w: build_input(fields, batch, w) for w in workers}
            for ds in sets.values():
                ds.get_batch(0)
            times: dict = {w: [] for w in workers}
            for r in range(repeats):
                for w, ds in sets.items():
                    start = time.perf_counter()
                    for step in range(1 + r * batches, 1 + (r + 1) * batches):
                        ds.get_batch(step)
                    times[w].append(time.perf_counter() - start)
            for ds in sets.values():
                ds.close()
        out = {"batch": batch, "batches_per_call": batches, "workers": {}}
        for w in workers:
            r = {"seconds": summary(times[w])}
            out["workers"][w] = {**r, "images_per_s": rate(r, batch * batches),
                                 "speedup": summary([a / b for a, b in zip(times[workers[0]], times[w])])}
        results[name] = out
    return results


def fake_multi_step(step_seconds: float) -> Callable:
    """A stand-in for ``vdm.train_step.multi_step`` (guarded signature): every step reads the mean
    of its batch and waits ``step_seconds`` in a host callback, i.e. a device busy for that long
    that leaves the host's CPUs free, as an accelerator does."""
    def wait(x):
        time.sleep(step_seconds)
        return x

    def one_step(state, batch):
        loss = jax.pure_callback(wait, jax.ShapeDtypeStruct((), jnp.float32), jnp.mean(batch["x"]))
        return state.replace(step=state.step + 1), {"loss": loss, "grad_norm": jnp.zeros((), jnp.float32)}

    def make(reductions, **unused):
        def multi_step(state, batches, bad):
            state, metrics = jax.lax.scan(one_step, state, batches)
            return state, metrics, bad
        return multi_step
    return make


def overlap_config(jpeg_folder: str, batch: int, steps: int):
    """configs/image_folder.py (128 px, flips) with a tiny UNet (only its init and the final
    evaluation run: the step is ``fake_multi_step``), logging every 10 steps."""
    import importlib.util

    from vdm import config as config_lib

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "image_folder.py")
    spec = importlib.util.spec_from_file_location("image_folder_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.path = jpeg_folder
    # 3 down-samplings: the middle block's attention runs at 16x16, not 128x128
    c.model.update(dict(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), num_groups=4))
    c.diffusion.T = 50
    c.optim.accum_steps = 1
    c.train.update(dict(batch_size=batch, num_steps=steps, log_every=10, checkpoint_every=steps))
    c.eval.update(dict(every=steps, batch_size=16, num_batches=1, elbo_samples=2))
    c.sample.update(dict(num_samples=0, num_steps=5))
    config_lib.validate(c)
    return c


def loop_state(config, dataset):
    """The TrainState the loop of ``config`` starts from (its network's params, EMA params and
    Adam state): the step alone is timed on the same state, whose hundreds of arrays the step
    passes through, as in the loop."""
    from vdm import build, train_step

    optimizer = train_step.make_optimizer(config.optim, config.train.num_steps)
    return train_step.initial_state(build.build_setup(config, dataset), optimizer, jax.random.PRNGKey(config.seed))


def bench_overlap(jpeg_folder: str, step_seconds: float, steps: int, batch: int, workers: int) -> dict:
    """Seconds per step of the real loop (``vdm.train.train_and_evaluate``) on the JPEG folder with
    ``fake_multi_step`` as its step, with the batches prefetched (train.prefetch = 2) and made
    synchronously (0), beside the fake step alone (back to back on one placed batch) and the
    loader alone. Loop figures: the logged steps/s of every 10-step interval after the first."""
    import tempfile

    from vdm import parallel
    from vdm import train as train_lib
    from vdm import train_step

    make = fake_multi_step(step_seconds)
    runner = parallel.PmapRunner(make, lambda reductions: lambda *batch_args: {})  # no eval: the step alone
    p_train = runner.train
    ds = build_input(input_sources(jpeg_folder)["jpeg folder 128 px"][0], batch, workers)
    batches = runner.place_batches(train_step.stack_steps([ds.get_batch(0)]))
    state = runner.place_state(loop_state(overlap_config(jpeg_folder, batch, steps), ds))
    bad = runner.flag(-1)
    jax.block_until_ready(p_train(state, batches, bad))
    alone, load = [], []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(10):
            out = p_train(state, batches, bad)
        jax.block_until_ready(out)
        alone.append((time.perf_counter() - start) / 10)
        start = time.perf_counter()
        for step in range(10):
            ds.get_batch(step)
        load.append((time.perf_counter() - start) / 10)
    ds.close()
    result = {"step_seconds_alone": summary(alone), "load_seconds_per_batch": summary(load), "batch": batch,
              "workers": workers, "steps": steps, "fake_step_seconds": step_seconds}
    original = train_step.multi_step
    train_step.multi_step = make
    try:
        for prefetch in (2, 0):
            config = overlap_config(jpeg_folder, batch, steps)
            config.train.prefetch, config.data.workers = prefetch, workers
            with tempfile.TemporaryDirectory() as workdir:
                train_lib.train_and_evaluate(config, workdir)
                with open(os.path.join(workdir, "metrics.jsonl")) as f:
                    rates = [json.loads(line)["steps_per_sec"] for line in f if "steps_per_sec" in line]
            per_step = summary([1.0 / r for r in rates[1:]])
            result[f"loop_prefetch_{prefetch}"] = {"seconds_per_step": per_step,
                                                   "over_step_alone": ratio(per_step, result["step_seconds_alone"])}
    finally:
        train_step.multi_step = original
    return result


def input_rows(inputs: dict | None, overlap: dict | None) -> list[dict]:
    rows = []
    for name, r in (inputs or {}).items():
        for w, x in r["workers"].items():
            rows.append(row(f"input {name}, batch {r['batch']}, {w} worker(s)", fmt(x["images_per_s"], 0), "images/s"))
            if w != min(r["workers"]):
                rows.append(row(f"input {name}, {w} workers / {min(r['workers'])}", fmt(x["speedup"], 2), "ratio"))
    if overlap:
        o = overlap
        rows.append(row(f"overlap: fake step alone ({o['fake_step_seconds'] * 1e3:.0f} ms asked)",
                        fmt(o["step_seconds_alone"], 4), "s"))
        rows.append(row(f"overlap: jpeg 128 px loader alone, batch {o['batch']}, {o['workers']} worker(s)",
                        fmt(o["load_seconds_per_batch"], 4), "s/batch"))
        for prefetch in (2, 0):
            loop = o[f"loop_prefetch_{prefetch}"]
            rows.append(row(f"overlap: real loop, train.prefetch={prefetch}", fmt(loop["seconds_per_step"], 4),
                            "s/step"))
            rows.append(row(f"overlap: real loop, train.prefetch={prefetch} / step alone",
                            fmt(loop["over_step_alone"], 3), "ratio"))
    return rows


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Per-device memory of the mesh train step: replicated vs FSDP (compiled, not run).
# ---------------------------------------------------------------------------

# preset -> (image size, global batch): Ho et al.'s CIFAR-10 UNet at its training batch of 128;
# the 471M ADM-layout UNet at 64x64 with 8 images per device of an 8-device mesh.
MEMORY_PRESETS = {"ddpm_cifar10": (32, 128), "adm64_unet256": (64, 64)}


def abstract_train_state(config, image_shape):
    """(setup, optimizer, TrainState of ShapeDtypeStructs) of ``config``: nothing is initialised."""
    import types

    from vdm import build
    from vdm import train_step

    data = types.SimpleNamespace(data_shape=tuple(image_shape), is_discrete_8bit=True)
    setup = build.build_setup(config, data)
    optimizer = train_step.make_optimizer(config.optim, config.train.num_steps)
    params = jax.eval_shape(setup.init_params, jax.random.PRNGKey(0))
    state = train_step.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, ema_params=params,
        opt_state=jax.eval_shape(optimizer.init, params), rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        loss_state=jax.eval_shape(setup.objective.init_loss_state))
    return setup, optimizer, state


def bench_memory(preset: str, devices: int, dtype: str) -> dict:
    """Per-device bytes of the mesh train step (``train.parallelism = mesh``) of ``preset`` on
    ``devices`` devices, replicated (fsdp 1) and fully sharded (fsdp = devices), from XLA's
    memory plan of the compiled step (``compiled.memory_analysis()``; the state is donated, as
    a long run would): the state's arguments split into params + EMA params and optimizer
    state (from the shardings), the batch, and the temporaries (activations, gradients,
    gathered parameters)."""
    from vdm import parallel
    from vdm import train_step
    from vdm.models import presets

    size, batch = MEMORY_PRESETS[preset]
    config = unet_config(128, (1,), batch, dtype)
    config.model = presets.PRESETS[preset]()
    config.model.dtype = dtype
    config.train.parallelism = "mesh"
    setup, optimizer, state = abstract_train_state(config, (size, size, 3))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    out = {"num_params": num_params, "image_size": size, "global_batch": batch, "devices": devices, "fsdp": {}}
    for fsdp in sorted({1, devices}):
        mesh = parallel.make_mesh(fsdp, jax.devices()[:devices])
        steps = lambda reductions: train_step.multi_step(reductions, objective=setup.objective,  # noqa: E731
                                                        optimizer=optimizer, optim=config.optim)
        evals = lambda reductions: functools.partial(train_step.eval_step, objective=setup.objective,  # noqa: E731
                                                     reductions=reductions)
        runner = parallel.MeshRunner(steps, evals, state, mesh, config.train.fsdp_min_size, donate=True)
        x = jax.ShapeDtypeStruct((1, batch, size, size, 3), jnp.float32, sharding=runner.batch_sharding)
        start = time.perf_counter()
        flag = jax.ShapeDtypeStruct((), jnp.int32, sharding=runner.replicated)
        compiled = runner.train.lower(parallel.abstract(state, runner.shardings), {"x": x}, flag).compile()
        mem = compiled.memory_analysis()
        sh = runner.shardings
        weights = (parallel.per_device_bytes(state.params, sh.params)
                   + parallel.per_device_bytes(state.ema_params, sh.ema_params))
        out["fsdp"][fsdp] = {
            "compile_s": time.perf_counter() - start,
            "params_and_ema_bytes": weights,
            "opt_state_bytes": parallel.per_device_bytes(state.opt_state, sh.opt_state),
            "batch_bytes": int(np.prod(x.sharding.shard_shape(x.shape))) * 4,
            "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
            "peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                              - mem.alias_size_in_bytes)}
        print(f"memory {preset} fsdp {fsdp}: compiled in {out['fsdp'][fsdp]['compile_s']:.0f} s", flush=True)
    rep, shard = out["fsdp"][1], out["fsdp"][devices]
    state_bytes = lambda r: r["params_and_ema_bytes"] + r["opt_state_bytes"]  # noqa: E731
    out["state_ratio"] = state_bytes(shard) / state_bytes(rep)
    out["peak_ratio"] = shard["peak_bytes"] / rep["peak_bytes"]
    return out


def memory_table(name: str, m: dict) -> str:
    """The memory section of one preset: MiB per device, replicated beside fsdp."""
    cols = sorted(m["fsdp"], key=int)
    head = f"per-device memory, {name} ({m['num_params'] / 1e6:.1f}M params, {m['image_size']}x{m['image_size']}, " \
           f"global batch {m['global_batch']}, {m['devices']} devices), MiB: " + " | ".join(
               "replicated" if int(c) == 1 else f"fsdp {c}" for c in cols)
    lines = [head]
    for key, what in (("params_and_ema_bytes", "params + EMA"), ("opt_state_bytes", "Adam state"),
                      ("batch_bytes", "batch"), ("temp_bytes", "temporaries (activations, grads)"),
                      ("peak_bytes", "XLA peak (args + outputs + temps - donated)")):
        lines.append(f"  {what:45s}" + " | ".join(f"{m['fsdp'][c][key] / 2 ** 20:10.0f}" for c in cols))
    lines.append(f"  params + EMA + Adam state, fsdp / replicated: {m['state_ratio']:.3f}; "
                 f"peak: {m['peak_ratio']:.3f}")
    return "\n".join(lines)


def fmt(stats: dict | None, digits: int = 1) -> str:
    if stats is None:
        return "-"
    return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.0f}"


def table(rows: list[dict]) -> str:
    """Rows of {what, value, unit, compile_s, peak_mib} as an aligned text table."""
    head = ("benchmark", "median [min, max]", "unit", "compile s", "peak MiB")
    body = [(r["what"], r["value"], r["unit"], r["compile"], r["peak"]) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def row(what: str, value: str, unit: str, r: dict | None = None) -> dict:
    return {"what": what, "value": value, "unit": unit,
            "compile": "-" if r is None else f"{r['compile_s']:.1f}",
            "peak": "-" if r is None else mib(r["device_peak_bytes"] or r["xla_peak_bytes"])}


def ratio(a: dict, b: dict) -> dict:
    """Elementwise min/median/max ratio of two timing summaries."""
    return {k: a[k] / b[k] for k in ("min", "median", "max")}


def limits_rows(limits: dict) -> list[dict]:
    m, c = limits["matmul"], limits["conv"]
    rows = [row(f"matmul {'x'.join(map(str, m['shape']))}", fmt(m["gflops"]), "GFLOP/s", m)]
    for name in ("forward+backward", "forward+backward unet", "forward", "backward_input", "backward_kernel"):
        rows.append(row(f"conv3x3 {name} {'x'.join(map(str, c['shape']))}", fmt(c[name]["gflops"]),
                        "GFLOP/s", c[name]))
    return rows


def unet_rows(size: str, u: dict, conv_limits: dict | None, peak: float | None) -> list[dict]:
    rows = []
    if "train" in u:
        t = u["train"]
        rows.append(row(f"train {size} ({t['num_params'] / 1e6:.2f}M params, batch {t['batch']})",
                        fmt(t["images_per_s"], 2), "images/s", t))
        rows.append(row(f"train {size} matmul/conv ({t['gflop_per_image']:.2f} GFLOP/image)",
                        fmt(t["gflops"]), "GFLOP/s"))
        for name, limit in (conv_limits or {}).items():
            t[f"share_of_{name}"] = {k: v / limit for k, v in t["gflops"].items()}
            rows.append(row(f"train {size} / {name.replace('_', ' ')}", fmt(t[f"share_of_{name}"], 2), "ratio"))
        if peak:
            t["mfu"] = {k: v / (peak * 1e3) for k, v in t["gflops"].items()}
            rows.append(row(f"train {size} model FLOPs utilisation (peak {peak:g} TFLOP/s)",
                            fmt(t["mfu"], 3), "ratio"))
    if "forward" in u:
        f = u["forward"]
        rows.append(row(f"forward {size} batch {f['batch']}", fmt(f["seconds"], 3), "s", f))
    for name, smp in u.get("samplers", {}).items():
        steps = f"{smp['steps']} vs {2 * smp['steps']} steps"
        rows.append(row(f"{name} {size} batch {smp['batch']}, per step ({steps})", fmt(smp["step_seconds"], 3),
                        "s", smp))
        if "forward" in u:
            smp["step_over_forward"] = ratio(smp["step_seconds"], u["forward"]["seconds"])
            rows.append(row(f"{name} {size} step / forward", fmt(smp["step_over_forward"], 3), "ratio"))
        rows.append(row(f"{name} {size} compile {smp['steps']} vs {smp['compile_steps']} steps",
                        f"{smp['compile_s']:.1f} vs {smp['compile_s_long']:.1f}", "s"))
    if "elbo" in u:
        e = u["elbo"]
        rows.append(row(f"exact ELBO {size} T={e['T']} (batch {e['batch']}, chunk {e['chunk']})",
                        fmt(e["images_per_s"], 4), "images/s", e))
        per_call = {k: v / -(-e["T"] // e["chunk"]) for k, v in e["seconds"].items()}
        e["network_call_over_forward"] = ratio(per_call, e["forward"]["seconds"])
        rows.append(row(f"exact ELBO {size} per network call / forward at batch {e['forward']['batch']}",
                        fmt(e["network_call_over_forward"], 3), "ratio"))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per figure (after one warm-up)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help=f"UNet sizes, subset of {tuple(UNET_SIZES)}")
    p.add_argument("--train-batch", type=int, default=None,
                   help="global training batch for every size (default: small 32, base 16)")
    p.add_argument("--steps-per-call", type=int, default=10,
                   help="train steps per host call (one lax.scan), as in configs/cifar10.py")
    p.add_argument("--samplers", default="ancestral,ddim", help="samplers to time (vdm.samplers.SAMPLERS)")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="batch of the forward and the samplers (default: the size's training batch)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="number of CPU devices (jax_num_cpu_devices; the train step is pmapped over them)")
    p.add_argument("--sample-steps", type=int, default=10,
                   help="steps of the shorter timed sampler run (the longer one has twice as many)")
    p.add_argument("--compile-steps", type=int, default=1000, help="steps of the compile-only sampler")
    p.add_argument("--elbo-sizes", default="small", help="UNet sizes for the exact ELBO")
    p.add_argument("--elbo-batch", type=int, default=1, help="images per exact-ELBO call")
    p.add_argument("--elbo-chunk", type=int, default=32, help="timesteps per network call in the ELBO")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n x n matmul (default 2048 CPU, 8192 GPU)")
    p.add_argument("--input-workers", default="1,2,4", help="decoding threads (data.workers) to time")
    p.add_argument("--input-batches", type=int, default=8, help="batches per timed input call")
    p.add_argument("--jpeg-folder", default="",
                   help="JPEG folder of the input/overlap sections (default: 256 photo-like 128x128 "
                        "JPEGs made in a temporary folder)")
    p.add_argument("--overlap-step-ms", type=float, default=50.0, help="the fake step's duration")
    p.add_argument("--overlap-steps", type=int, default=80, help="steps of each overlap loop run")
    p.add_argument("--overlap-workers", type=int, default=0, help="data.workers of the overlap runs (0: auto)")
    p.add_argument("--json", default="benchmark.json", help="where to write the results")
    p.add_argument("--memory-presets", default=",".join(MEMORY_PRESETS),
                   help=f"model presets of the memory section, subset of {tuple(MEMORY_PRESETS)}")
    p.add_argument("--memory-devices", type=int, default=8,
                   help="devices of the memory section's mesh (CPU: that many forced host devices)")
    args = p.parse_args(argv)
    for name, allowed in (("only", SECTIONS), ("sizes", tuple(UNET_SIZES)), ("elbo_sizes", tuple(UNET_SIZES)),
                          ("memory_presets", tuple(MEMORY_PRESETS))):
        value = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in value if v not in allowed]
        if bad:
            p.error(f"--{name.replace('_', '-')}: unknown value(s) {bad}; allowed: {', '.join(allowed)}")
        setattr(args, name, value)
    args.samplers = [v for v in args.samplers.split(",") if v]
    try:
        args.input_workers = [int(v) for v in args.input_workers.split(",") if v]
    except ValueError:
        p.error(f"--input-workers: comma-separated integers >= 1, got {args.input_workers!r}")
    if not args.input_workers or min(args.input_workers) < 1:
        p.error(f"--input-workers: comma-separated integers >= 1, got {args.input_workers}")
    if args.overlap_steps < 20 or args.overlap_steps % 10:
        p.error(f"--overlap-steps must be a multiple of 10 and >= 20 (logged every 10), got {args.overlap_steps}")
    if args.overlap_step_ms <= 0 or args.overlap_workers < 0:
        p.error("--overlap-step-ms must be > 0 and --overlap-workers >= 0")
    for name in ("repeats", "steps_per_call", "sample_steps", "compile_steps", "elbo_batch", "elbo_chunk",
                 "input_batches", "memory_devices"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_batch", "sample_batch", "cpu_devices"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
    if "memory" in args.only and jax.devices()[0].platform == "cpu" and jax.device_count() < args.memory_devices:
        raise SystemExit(f"--memory-devices {args.memory_devices}: this process has {jax.device_count()} CPU "
                         f"device(s); run with XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{args.memory_devices}")
    if "sample" in args.only:
        from vdm import samplers

        try:  # refused now, not after the training section
            for size in args.sizes:
                sample_devices(args.sample_batch or train_batch(args, size))
        except ValueError as e:
            raise SystemExit(str(e)) from None

        bad = [s for s in args.samplers if s not in samplers.SAMPLERS]
        if bad:
            raise ValueError(f"--samplers: unknown {bad}; allowed: {', '.join(samplers.SAMPLERS)}")
    info = device_info()
    peak = peak_tflops(info, args.dtype)
    results: dict[str, Any] = {"device": info, "dtype": args.dtype, "repeats": args.repeats,
                               "command": " ".join(["python"] + sys.argv), "peak_tflops": peak, "unet": {}}
    print(f"device: {info['backend']} {info['device_kind']} x{info['device_count']} | host {info['host_cpu']} "
          f"({info['host_cores']} cores) | jax {info['jax']} | dtype {args.dtype} | "
          f"{args.repeats} timed calls per figure after one warm-up: median [min, max]", flush=True)
    # Round 1: the limits and every training run, interleaved (the train shares are ratios
    # to the limits); then per size the forward and the samplers; then the ELBO and the
    # forward at its batch. UNetBench objects are built once per size.
    sizes = list(dict.fromkeys(args.sizes + (args.elbo_sizes if "elbo" in args.only else [])))
    sizes = sizes if {"train", "sample", "elbo"} & set(args.only) else []
    benches = {}
    for size in sizes:
        ch, ch_mult, _ = UNET_SIZES[size]
        benches[size] = UNetBench(ch, ch_mult, train_batch(args, size), args.dtype, args.steps_per_call)
        results["unet"][size] = {"num_params": benches[size].num_params}
    first: dict[str, Pending] = {}
    if "limits" in args.only:
        n = args.matmul_size or (2048 if info["backend"] == "cpu" else 8192)
        first["matmul"] = bench_matmul(n, args.dtype)
        first["conv"] = bench_conv(32, 32, 128, args.dtype)
    if "train" in args.only:
        first.update({f"train {size}": bench_train(benches[size]) for size in args.sizes})
    done = run_interleaved(first, args.repeats) if first else {}
    conv_limits = None
    if "limits" in args.only:
        results["limits"] = lim = {"matmul": done["matmul"], "conv": done["conv"]}
        # Shares are taken of the medians of the same run.
        conv_limits = {"xla_conv_fwd_bwd": lim["conv"]["forward+backward"]["gflops"]["median"],
                       "unet_conv_fwd_bwd": lim["conv"]["forward+backward unet"]["gflops"]["median"],
                       "conv_forward": lim["conv"]["forward"]["gflops"]["median"],
                       "matmul": lim["matmul"]["gflops"]["median"]}
    for size in args.sizes if "train" in args.only else []:
        results["unet"][size]["train"] = done[f"train {size}"]
    for size in sizes:
        ub, u = benches[size], results["unet"][size]
        if size in args.sizes and "sample" in args.only:
            sample_batch = args.sample_batch or ub.batch
            group = {"forward": bench_forward(ub, sample_batch, sample_devices(sample_batch))}
            group.update({s: bench_sampler(ub, s, sample_batch, args.sample_steps, args.compile_steps)
                          for s in args.samplers})
            done = run_interleaved(group, args.repeats)
            u["forward"] = done.pop("forward")
            u["samplers"] = done
        if size in args.elbo_sizes and "elbo" in args.only:
            call_batch = args.elbo_batch * args.elbo_chunk
            done = run_interleaved({"elbo": bench_elbo(ub, args.elbo_batch, args.elbo_chunk),
                                    "forward": bench_forward(ub, call_batch)}, args.repeats)
            u["elbo"] = {**done["elbo"], "forward": done["forward"]}
    if {"input", "overlap"} & set(args.only):
        import tempfile

        scratch = tempfile.TemporaryDirectory()
        folder = args.jpeg_folder or make_jpeg_folder(os.path.join(scratch.name, "jpeg128"))
        if "input" in args.only:
            results["input"] = bench_input(folder, args.input_workers, args.input_batches, args.repeats)
        if "overlap" in args.only:
            results["overlap"] = bench_overlap(folder, args.overlap_step_ms / 1e3, args.overlap_steps, 32,
                                               args.overlap_workers)
        scratch.cleanup()
    if "memory" in args.only:
        results["memory"] = {name: bench_memory(name, args.memory_devices, args.dtype)
                             for name in args.memory_presets}
    rows: list[dict] = []
    if "limits" in results:
        rows += limits_rows(results["limits"])
    for size in sizes:
        rows += unet_rows(size, results["unet"][size], conv_limits, peak)
    rows += input_rows(results.get("input"), results.get("overlap"))
    if rows:
        print(table(rows))
    for name, m in results.get("memory", {}).items():
        print(memory_table(name, m))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
