"""Draw samples from a trained workdir's checkpoint (EMA parameters by default).

    python scripts/sample.py --workdir=runs/digits
    python scripts/sample.py --workdir=runs/digits --sampler=ddim --num_steps=50 --eta=0.0
    python scripts/sample.py --workdir=runs/mixture1d --num_samples=2000
    python scripts/sample.py --workdir=runs/digits_conditional --label=all --num_samples=8 --guidance_scale=2

A class-conditional model (``config.data.conditional``) samples class ``--label=k``, or with
``--label=all`` ``--num_samples`` of every class (grid.png: one row per class), at
classifier-free guidance scale ``--guidance_scale=w`` (``vdm.guidance``; 0: the
conditional model); without ``--label`` it samples its null class (the unconditional model).

The config is the one the run saved (workdir/config.json) unless --config names a
file. Writes into --out (default workdir/samples/<sampler>_<steps>steps_seed<seed>/):
  samples.npz       samples [N, ...], and the trajectory (times, x_t, x0_hat) every
                    few steps (at most --frames records)
  images:           grid.png (the samples) and denoise.gif (seed 000's two animations
                    side by side: the noisy x_t and the predicted x_0 at each step)
  1-D toy data:     hist.png (histogram against the data density) and
                    trajectories.png (seed 002's paths through time, coloured by mode)
  2-D toy data:     scatter.png (samples over fresh data and the density contours)
"""
import ast
import math
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdm import cli  # noqa: E402  (after the path insert)

cli.quiet_startup()

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/ and config.json).", required=True)
_CONFIG = cli.define_config_file("config", None, "Config file (default: workdir/config.json).", lock_config=False)
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to load (-1: the latest).")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA ones.")
_SAMPLER = flags.DEFINE_string("sampler", "ancestral", "One of vdm.samplers.SAMPLERS.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 0, "Sampling steps (0: all T steps; required in "
                                  "continuous time unless the config's sample.num_steps is set).")
_SPACING = flags.DEFINE_string("spacing", "linspace", "Time spacing of a reduced grid.")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (sampler=ddim).")
_OPTIONS = flags.DEFINE_multi_string("option", [], "Other sampler options as key=value, e.g. method=heun, "
                                     "corrector_steps=2, snr=0.16, steps_per_level=50.")
_CLIP = flags.DEFINE_bool("clip_x0", None, "Clip predicted x0 to [-1, 1] (default: on for images).")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FRAMES = flags.DEFINE_integer("frames", 100, "At most this many trajectory records (GIF frames, paths).")
_OUT = flags.DEFINE_string("out", "", "Output directory.")
_LABEL = flags.DEFINE_string("label", "", "Class-conditional model: a class k, or 'all' (--num_samples per class, "
                             "one grid row per class); empty: the null class (unconditional).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 0.0, "Classifier-free guidance scale w >= 0 with --label "
                               "(Ho & Salimans 2022; 0: the conditional model).")


def parse_options(pairs):
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise app.UsageError(f"--option must be key=value, got {pair!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def parse_labels(value: str, num_classes: int, num_samples: int):
    """--label as int32 labels [N] (None without --label) and the grid's images per row:
    k -> num_samples copies of k; all -> num_samples of each class, one row per class."""
    import numpy as np

    if not value:
        return None, None
    if not num_classes:
        raise app.UsageError(f"--label={value}: the model is not class-conditional (config.data.conditional)")
    if value == "all":
        return np.repeat(np.arange(num_classes, dtype=np.int32), num_samples), num_samples
    if not value.isdigit() or int(value) >= num_classes:
        raise app.UsageError(f"--label must be a class in 0..{num_classes - 1} or 'all', got {value!r}")
    return np.full((num_samples,), int(value), np.int32), None


def check_guidance(guidance_scale: float, labels) -> None:
    """--guidance_scale is a finite w >= 0 and, when not 0, needs --label."""
    if not (guidance_scale >= 0 and math.isfinite(guidance_scale)):
        raise app.UsageError(f"--guidance_scale must be a finite number >= 0, got {guidance_scale}")
    if guidance_scale and labels is None:
        raise app.UsageError("--guidance_scale needs --label (the class to guide towards)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax
    import numpy as np

    from vdm import build, checkpoints, data, guidance, samplers, viz

    workdir = _WORKDIR.value
    with cli.usage_errors():
        config = _CONFIG.value or checkpoints.load_run_config(workdir)
    options = parse_options(_OPTIONS.value)
    if _ETA.value is not None:
        options["eta"] = _ETA.value
    dataset = data.build_dataset(config.data, split="train", global_batch_size=jax.local_device_count(),
                                 seed=config.seed)
    setup = build.build_setup(config, dataset)
    labels, per_row = parse_labels(_LABEL.value, setup.network.num_classes, _NUM.value)
    check_guidance(_GUIDANCE.value, labels)
    num = _NUM.value if labels is None else len(labels)
    with cli.usage_errors():
        params, step = checkpoints.restore_params(workdir, config.train, _STEP.value, _RAW.value)
    process, d = setup.process, config.diffusion
    images = len(dataset.data_shape) == 3

    num_steps = _NUM_STEPS.value or config.get("sample", {}).get("num_steps", 0) or None
    if num_steps is None and not process.discrete:
        raise app.UsageError("--num_steps is required for a continuous-time model")
    steps = num_steps or process.T
    every = max(1, math.ceil(steps / _FRAMES.value))
    clip = images if _CLIP.value is None else _CLIP.value

    key, shape = jax.random.PRNGKey(_SEED.value), (num,) + tuple(dataset.data_shape)
    common = dict(sampler=_SAMPLER.value, num_steps=num_steps, spacing=_SPACING.value,
                  clip_x0=(-1.0, 1.0) if clip else None, trajectory_every=every, **options)
    with cli.usage_errors():
        if labels is None:
            samples, traj = samplers.sample(
                build.make_model_fn(setup.network, process, d.time_input, params), key, shape,
                schedule=process.schedule,
                log_snr_fn=None if process.discrete else (lambda t: process.log_snr(params, t)),
                parameterization=d.parameterization, variance_type=d.variance, **common)
        else:
            samples, traj = guidance.sample_guided(guidance.network_model_fn(setup, d.time_input), setup, config,
                                                   params, key, labels, _GUIDANCE.value, shape, **common)
    samples, traj = np.asarray(samples), jax.tree.map(np.asarray, traj)

    name = f"{_SAMPLER.value}_{steps}steps_seed{_SEED.value}" + label_suffix(_LABEL.value, _GUIDANCE.value)
    out = _OUT.value or os.path.join(workdir, "samples", name)
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "samples.npz")]
    np.savez(written[0], samples=samples, traj_times=traj.times, traj_x=traj.x, traj_x0=traj.x0,
             checkpoint_step=step, **({} if labels is None else dict(labels=labels, guidance_scale=_GUIDANCE.value)))
    if images:
        scale = viz.display_scale(dataset.data_shape[0])
        written.append(viz.save_image_grid(os.path.join(out, "grid.png"), samples, nrow=per_row, scale=scale))
        n = min(len(samples), 64)
        written.append(viz.save_denoising_gif(os.path.join(out, "denoise.gif"), traj.x[:, :n], traj.x0[:, :n],
                                              max_frames=_FRAMES.value, scale=scale))
    elif samples.shape[-1] == 1:
        written.append(viz.plot_1d_samples(os.path.join(out, "hist.png"), samples, dataset.log_prob,
                                           title=f"{_SAMPLER.value}, {steps} steps"))
        done = np.minimum(np.arange(1, len(traj.x) + 1) * every, steps)  # steps taken at each record
        written.append(viz.plot_trajectories(os.path.join(out, "trajectories.png"), traj.x, steps=done))
    elif samples.ndim > 2 or samples.shape[-1] > 2:
        print(f"no plot for {samples.shape[1:]}-shaped vector samples (plots are for 1-D and 2-D data); "
              "the samples are in samples.npz")
    else:
        ref_ds = data.build_dataset(config.data, split="train", seed=config.seed,
                                    global_batch_size=len(samples) * jax.local_device_count())
        reference = ref_ds.get_batch(0)["x"].reshape((-1,) + tuple(dataset.data_shape))
        written.append(viz.plot_2d_samples(os.path.join(out, "scatter.png"), samples, data=reference,
                                           log_prob_fn=dataset.log_prob,
                                           title=f"{_SAMPLER.value}, {steps} steps"))
    print(f"checkpoint step {step}; {len(samples)} samples with {_SAMPLER.value}, {steps} steps")
    for path in written:
        print(f"  wrote {path}")


def label_suffix(label: str, guidance_scale: float) -> str:
    """The output folder's suffix for --label / --guidance_scale ('' without --label)."""
    return f"_label{label}_w{guidance_scale:g}" if label else ""


if __name__ == "__main__":
    cli.run(main)
