"""Draw samples from a trained workdir's checkpoint (EMA parameters by default).

    python scripts/sample.py --workdir=runs/digits
    python scripts/sample.py --workdir=runs/digits --sampler=ddim --num_steps=50 --eta=0.0
    python scripts/sample.py --workdir=runs/mixture1d --num_samples=2000
    python scripts/sample.py --workdir=runs/default --classifier_workdir=runs/digits_classifier \
        --label=3 --classifier_scale=2      # classifier guidance (scripts/train_classifier.py)
    python scripts/sample.py --workdir=runs/digits_conditional --label=all --num_samples=8 --guidance_scale=2

A class-conditional model (``config.data.conditional``) samples class ``--label=k``, or with
``--label=all`` ``--num_samples`` of every class (grid.png: one row per class), at
classifier-free guidance scale ``--guidance_scale=w`` (``samplers.classifier_free_guidance``;
0: the conditional model); without ``--label`` it samples its null class (the unconditional
model). An unconditional model samples class ``--label`` with classifier guidance from the
noisy classifier of ``--classifier_workdir`` at scale ``--classifier_scale``.

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
_SAMPLER = flags.DEFINE_string("sampler", None, "One of vdm.samplers.SAMPLERS (default: the config's sample.sampler).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 0, "Sampling steps (0: all T steps; required in "
                                  "continuous time unless the config's sample.num_steps is set).")
_SPACING = flags.DEFINE_string("spacing", None, "Time spacing of a reduced grid (default: the config's sample.spacing).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (sampler=ddim).")
_OPTIONS = flags.DEFINE_multi_string("option", [], "Other sampler options as key=value, e.g. method=heun, "
                                     "corrector_steps=2, snr=0.16, steps_per_level=50.")
_CLIP = flags.DEFINE_bool("clip_x0", None, "Clip predicted x0 to [-1, 1] (default: on for images).")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of samples; spread over every local device (pmap) "
                           "when their count divides it, with the same samples as on one device.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FRAMES = flags.DEFINE_integer("frames", 100, "At most this many trajectory records (GIF frames, paths).")
_OUT = flags.DEFINE_string("out", "", "Output directory.")
_LABEL = flags.DEFINE_string("label", "", "A class k, or 'all' (--num_samples per class, one grid row per class), "
                             "of a class-conditional model or of the classifier of --classifier_workdir; "
                             "empty: a conditional model's null class (unconditional).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 0.0, "Classifier-free guidance scale w >= 0 with --label "
                               "(Ho & Salimans 2022; 0: the conditional model).")
_CLASSIFIER_WORKDIR = flags.DEFINE_string("classifier_workdir", None, "Classifier guidance of an unconditional model: "
                                          "a noisy classifier's workdir (scripts/train_classifier.py); needs --label.")
_CLASSIFIER_SCALE = flags.DEFINE_float("classifier_scale", 1.0, "Classifier guidance scale s: eps - s sigma_t "
                                       "grad log p(label | x_t) (0: unguided).")


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


def load_classifier_run(data_shape):
    """The noisy classifier of --classifier_workdir (None without it), checked against the model's
    data shape before anything is sampled."""
    from vdm import noisy_classifier_train

    if _CLASSIFIER_WORKDIR.value is None:
        return None
    with cli.usage_errors():
        run = noisy_classifier_train.load_classifier(_CLASSIFIER_WORKDIR.value)
        noisy_classifier_train.check_guidance_inputs(run, data_shape, [])
    return run


def classifier_guide(run, labels, process, diffusion_cfg):
    """``guide(model_fn, params)`` of ``build.build_sampler``: classifier guidance towards
    ``labels`` (checked against its classes by ``parse_labels``) at --classifier_scale
    (``noisy_classifier_train.guided_model_fn``); None without a run."""
    from vdm import noisy_classifier_train

    if run is None:
        return None
    if labels is None:
        raise app.UsageError("--classifier_workdir needs --label (the class to guide the samples towards)")
    return lambda model_fn, params: noisy_classifier_train.guided_model_fn(
        model_fn, run, labels, _CLASSIFIER_SCALE.value, process, params, diffusion_cfg)


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

    from vdm import build, checkpoints, data, viz

    workdir = _WORKDIR.value
    with cli.usage_errors():
        config = _CONFIG.value or checkpoints.load_run_config(workdir)
    options = parse_options(_OPTIONS.value)
    if _ETA.value is not None:
        options["eta"] = _ETA.value
    dataset = data.build_dataset(config.data, split="train", global_batch_size=jax.local_device_count(),
                                 seed=config.seed)
    setup = build.build_setup(config, dataset)
    run = load_classifier_run(dataset.data_shape)
    labels, per_row = parse_labels(_LABEL.value, setup.network.num_classes or (run.num_classes if run else 0),
                                   _NUM.value)
    check_guidance(_GUIDANCE.value, labels)
    num = _NUM.value if labels is None else len(labels)
    with cli.usage_errors():
        params, step = checkpoints.restore_params(workdir, config.train, _STEP.value, _RAW.value)
    images = len(dataset.data_shape) == 3

    sampler = _SAMPLER.value or config.sample.sampler
    steps = _NUM_STEPS.value or build.sampling_steps(config.sample, config.diffusion)
    every = max(1, math.ceil(steps / _FRAMES.value))
    clip = images if _CLIP.value is None else _CLIP.value
    guide = classifier_guide(run, labels, setup.process, config.diffusion)
    label_args = {} if guide is not None or not setup.network.num_classes else dict(
        labels=np.full(num, setup.network.num_classes, np.int32) if labels is None else labels,
        guidance_scale=_GUIDANCE.value)
    local = jax.local_device_count()
    devices = local if num % local == 0 else 1
    with cli.usage_errors():
        samples, traj = setup.sample(params, jax.random.PRNGKey(_SEED.value), num_samples=num,
                                     sampler=sampler, num_steps=steps, spacing=_SPACING.value,
                                     options=options or None, clip_x0=clip, trajectory_every=every, guide=guide,
                                     pmap=devices > 1, **label_args)
    samples, traj = np.asarray(samples), jax.tree.map(np.asarray, traj)

    name = f"{sampler}_{steps}steps_seed{_SEED.value}" + label_suffix(_LABEL.value, _GUIDANCE.value)
    if run is not None:
        name += f"_classifier{_CLASSIFIER_SCALE.value:g}"
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
                                           title=f"{sampler}, {steps} steps"))
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
                                           title=f"{sampler}, {steps} steps"))
    print(f"checkpoint step {step}; {len(samples)} samples with {sampler}, {steps} steps, "
          f"on {devices} device{'s' * (devices > 1)}")
    for path in written:
        print(f"  wrote {path}")


def label_suffix(label: str, guidance_scale: float) -> str:
    """The output folder's suffix for --label / --guidance_scale ('' without --label)."""
    return f"_label{label}_w{guidance_scale:g}" if label else ""


if __name__ == "__main__":
    cli.run(main)
