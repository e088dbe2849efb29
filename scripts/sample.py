"""Draw samples from a trained workdir's checkpoint (EMA parameters by default).

    python scripts/sample.py --workdir=runs/digits
    python scripts/sample.py --workdir=runs/digits --sampler=ddim --num_steps=50 --eta=0.0
    python scripts/sample.py --workdir=runs/mixture1d --num_samples=2000
    python scripts/sample.py --workdir=runs/default --classifier_workdir=runs/digits_classifier \
        --label=3 --classifier_scale=2      # classifier guidance (scripts/train_classifier.py)

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
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FRAMES = flags.DEFINE_integer("frames", 100, "At most this many trajectory records (GIF frames, paths).")
_OUT = flags.DEFINE_string("out", "", "Output directory.")
_LABEL = flags.DEFINE_integer("label", None, "Class of every sample (guided sampling).")
_CLASSIFIER_WORKDIR = flags.DEFINE_string("classifier_workdir", None, "Classifier guidance: a noisy classifier's "
                                          "workdir (scripts/train_classifier.py); needs --label.")
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


def load_guiding_classifier(data_shape, num_samples):
    """(classifier run, labels [N]) for --classifier_workdir, checked against the model's data shape
    and --label before anything is sampled; None without --classifier_workdir."""
    import numpy as np

    from vdm import noisy_classifier_train

    if _CLASSIFIER_WORKDIR.value is None:
        return None
    if _LABEL.value is None:
        raise app.UsageError("--classifier_workdir needs --label (the class to guide the samples towards)")
    labels = np.full((num_samples,), _LABEL.value, np.int32)
    with cli.usage_errors():
        run = noisy_classifier_train.load_classifier(_CLASSIFIER_WORKDIR.value)
        noisy_classifier_train.check_guidance_inputs(run, data_shape, labels)
    return run, labels


def classifier_guided(model_fn, guiding, process, params, diffusion_cfg):
    """``model_fn`` guided by the classifier of ``load_guiding_classifier`` (unchanged when None)."""
    from vdm import noisy_classifier_train

    if guiding is None:
        return model_fn
    run, labels = guiding
    return noisy_classifier_train.guided_model_fn(model_fn, run, labels, _CLASSIFIER_SCALE.value, process, params,
                                                  diffusion_cfg)


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
    guiding = load_guiding_classifier(dataset.data_shape, _NUM.value)
    with cli.usage_errors():
        params, step = checkpoints.restore_params(workdir, config.train, _STEP.value, _RAW.value)
    images = len(dataset.data_shape) == 3

    sampler = _SAMPLER.value or config.sample.sampler
    steps = _NUM_STEPS.value or build.sampling_steps(config.sample, config.diffusion)
    every = max(1, math.ceil(steps / _FRAMES.value))
    clip = images if _CLIP.value is None else _CLIP.value
    guide = None if guiding is None else (
        lambda model_fn, p: classifier_guided(model_fn, guiding, setup.process, p, config.diffusion))
    with cli.usage_errors():
        samples, traj = setup.sample(params, jax.random.PRNGKey(_SEED.value), num_samples=_NUM.value,
                                     sampler=sampler, num_steps=steps, spacing=_SPACING.value,
                                     options=options or None, clip_x0=clip, trajectory_every=every, guide=guide)
    samples, traj = np.asarray(samples), jax.tree.map(np.asarray, traj)

    guided = "" if guiding is None else f"_label{_LABEL.value}_classifier{_CLASSIFIER_SCALE.value:g}"
    out = _OUT.value or os.path.join(workdir, "samples", f"{sampler}_{steps}steps_seed{_SEED.value}{guided}")
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "samples.npz")]
    np.savez(written[0], samples=samples, traj_times=traj.times, traj_x=traj.x, traj_x0=traj.x0,
             checkpoint_step=step)
    if images:
        scale = viz.display_scale(dataset.data_shape[0])
        written.append(viz.save_image_grid(os.path.join(out, "grid.png"), samples, scale=scale))
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
    print(f"checkpoint step {step}; {len(samples)} samples with {sampler}, {steps} steps")
    for path in written:
        print(f"  wrote {path}")


if __name__ == "__main__":
    cli.run(main)
