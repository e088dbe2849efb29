"""Evaluate a trained workdir: the negative ELBO over a split, and sample quality.

    python scripts/evaluate.py --workdir=runs/digits                       # exact sum over T terms
    python scripts/evaluate.py --workdir=runs/digits --elbo=exact,mc --num_samples=16
    python scripts/evaluate.py --workdir=runs/digits --elbo=ode --ode_steps=100 --ode_probes=4
    python scripts/evaluate.py --workdir=runs/mixture1d --sample_metrics --mode_centres=-4,4
    python scripts/evaluate.py --workdir=runs/cifar10 --sample_metrics --inception_weights=inception_fid.npz
    python scripts/evaluate.py --workdir=runs/digits_conditional --guidance_scale=0,0.5,1,2,4 --sampler=ddim \
        --sampling_steps=100

Likelihood (``vdm.likelihood.negative_elbo``): every example of ``--split``,
in bits/dim for images and nats for toy data, with standard errors and the
prior / diffusion / decoder breakdown. ``--elbo`` is a comma list of
``exact`` (discrete models: the sum over all T terms, Ho et al. 2020 eq. 5; a
continuous model with ``--exact_T=T``: the sum over the T terms of its T-step
bound, Kingma et al. 2021 eq. 15, which lies above the continuous one)
and ``mc`` (``--num_samples`` Monte-Carlo draws per example, low-discrepancy times in
continuous time). With both, the difference exact - mc and its standard
error are reported. Toy data with an exact density also get the exact NLL and
the gap -ELBO - NLL.

``ode``: the probability-flow ODE likelihood (``vdm.ode_likelihood``; Song et al.
2021 App. D) with ``--ode_steps`` Heun steps and the exact divergence (up to 16
dimensions) or ``--ode_probes`` Hutchinson probes; 8-bit images are uniformly
dequantized and reported as a bound on the 8-bit scale (+ log2(127.5) bits/dim).
Image evaluations also print the per-pixel categorical baseline of the split
(``vdm.baselines``) beside the bound.

``--estimator_variance_draws=K`` (continuous time) measures the variance of the
one-draw loss estimate, per example from K independent draws, averaged over the
split (Kingma et al. 2021, Fig. 4).

Sample quality (``--sample_metrics``): ``--num_generated`` samples from the
EMA parameters with ``--sampler``. Toy data: MMD and sliced Wasserstein to
fresh data, and with ``--mode_centres`` the fraction of samples nearest each
centre. Images: the Fréchet distance in the features of a small classifier
trained on the training split (cached in the workdir), and FID when
``--inception_weights`` names the weights file (nothing is downloaded).

A class-conditional model (``config.data.conditional``) is scored by its bound on
-log p(x | y) with each example's own label, or with ``--null_label`` on -log p(x) of its
null class (the unconditional model the label dropout trained; same noise draws, so the
two are paired). ``--guidance_scale=w1,w2,...`` (image data with
labels) draws ``--num_generated`` samples at each classifier-free guidance scale w, sample i
of class i mod K, with the first ``--sampler`` and ``--sampling_steps``, and reports the
accuracy of the feature classifier at the requested label (its binomial standard error
beside it, and the classifier's accuracy on the real split as the reference) and the
classifier Fréchet distance to the split (with the standard deviation over bootstrap
resamples of the generated samples); writes ``<workdir>/guidance.png`` (both against w)
and ``guidance_w<w>.png`` (one row per class).

Classifier guidance (``--classifier_workdir`` and ``--classifier_scale=s1,s2,...``): for each
scale s, ``--num_generated`` samples of the first --sampler / --sampling_steps with labels
cycling over the classes, guided by the noisy classifier (``vdm.classifier_guidance``); per
scale the accuracy (the fraction the clean feature classifier assigns to the requested
label, binomial standard error) and the classifier Fréchet distance to the split;
<workdir>/classifier_guidance.png. ``guidance_sweep`` takes any guided-model factory, so
classifier-free guidance rows come from the same code.

Prints the tables and writes ``<workdir>/eval_<split>.json`` (or ``--out``).
"""
import math
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdm import cli  # noqa: E402  (after the path insert)

cli.quiet_startup()


_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/ and config.json).", required=True)
_CONFIG = cli.define_config_file("config", None, "Config file (default: workdir/config.json).", lock_config=False)
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate the ELBO on.")
_ELBO = flags.DEFINE_list("elbo", [], "Comma list of likelihood estimates, from exact, mc, ode (default: exact "
                          "for a discrete model, mc for a continuous one; none to skip the ELBO).")
_ODE_STEPS = flags.DEFINE_integer("ode_steps", 100, "Heun steps of the probability-flow ODE for --elbo=ode "
                                   "(a discrete model: at most T - 1, on its integer timesteps).")
_ODE_DIVERGENCE = flags.DEFINE_enum("ode_divergence", "auto", ["auto", "exact", "hutchinson"],
                                    "Divergence for --elbo=ode (auto: exact up to 16 dimensions, else "
                                    "Hutchinson).")
_ODE_PROBES = flags.DEFINE_integer("ode_probes", 4, "Hutchinson probes per example for --elbo=ode.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 0, "Monte-Carlo draws per example for --elbo=mc "
                                    "(0: the config's eval.elbo_samples).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Evaluation batch size (0: the config's eval.batch_size).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "Stop after this many batches (0: the whole split).")
_CHUNK = flags.DEFINE_integer("chunk", 0, "Timesteps per model call in the exact sum (0: eval.elbo_chunk).")
_EXACT_T = flags.DEFINE_integer("exact_T", 0, "Continuous-time model, --elbo=exact: the T of its T-step bound "
                                "(Kingma et al. eq. 15), summed over all T terms (0: diffusion.T).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA ones.")
_SAMPLE_METRICS = flags.DEFINE_bool("sample_metrics", False, "Also draw samples and measure their quality.")
_NUM_GENERATED = flags.DEFINE_integer("num_generated", 1000, "Samples drawn for --sample_metrics.")
_SAMPLER = flags.DEFINE_list("sampler", ["ancestral"], "Comma list of samplers for --sample_metrics "
                              "(vdm.samplers.SAMPLERS).")
_SAMPLING_STEPS = flags.DEFINE_list("sampling_steps", ["0"], "Comma list of sampling step counts (0: all T; "
                                    "continuous time: the config's sample.num_steps). Several samplers or "
                                    "step counts: one row each, and <workdir>/sample_quality.png.")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (--sampler=ddim).")
_SPACING = flags.DEFINE_string("spacing", "", "Level spacing of the samplers (vdm.samplers.time_grid; "
                               "default: the config's sample.spacing).")
_MODES = flags.DEFINE_list("mode_centres", [], "Toy data: mode centres (1-D: numbers; 2-D: x:y pairs); "
                           "reports the fraction of samples nearest each.")
_INCEPTION = flags.DEFINE_string("inception_weights", "", "InceptionV3 FID weights (.npz) for FID on images.")
_CLASSIFIER_STEPS = flags.DEFINE_integer("classifier_steps", 1000, "Training steps of the feature classifier "
                                         "(first use only; cached in the workdir).")
_VARIANCE_DRAWS = flags.DEFINE_integer("estimator_variance_draws", 0, "Continuous-time model: also measure the "
                                       "variance of the one-draw loss estimate from this many independent "
                                       "draws per example (0: skip).")
_CLASSIFIER_WORKDIR = flags.DEFINE_string("classifier_workdir", None, "Classifier guidance sweep: a noisy "
                                          "classifier's workdir (scripts/train_classifier.py).")
_CLASSIFIER_SCALES = flags.DEFINE_list("classifier_scale", ["0", "0.5", "1", "2", "4", "8"],
                                       "Comma list of classifier guidance scales for --classifier_workdir.")
_GUIDANCE = flags.DEFINE_list("guidance_scale", [], "Class-conditional model: comma list of classifier-free "
                               "guidance scales w >= 0; accuracy and classifier FD of guided samples vs w.")
_NULL_LABEL = flags.DEFINE_bool("null_label", False, "Class-conditional model: bound -log p(x) with the null "
                                 "class for every example instead of -log p(x | y).")
_BOOTSTRAP = flags.DEFINE_integer("fd_bootstrap", 20, "Bootstrap resamples for the spread of the classifier FD "
                                  "in --guidance_scale.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the ELBO's noise and of the samples.")
_OUT = flags.DEFINE_string("out", "", "Output JSON (default: <workdir>/eval_<split>.json).")


def elbo_methods(values, discrete: bool, exact_T: int = 0) -> list:
    """The --elbo methods; exact needs a discrete model or, in continuous time, exact_T > 0."""
    from vdm import bounds

    methods = values or (["exact"] if discrete else ["mc"])
    if methods == ["none"]:
        return []
    for m in methods:
        if m not in bounds.ELBO_METHODS:
            raise app.UsageError(f"--elbo={m!r}: allowed values are {bounds.ELBO_METHODS} (comma-separated) or none")
        if m == "exact" and not discrete and exact_T < 1:
            raise app.UsageError("--elbo=exact needs a discrete-time model (diffusion.time = 'discrete') or, "
                                 "in continuous time, --exact_T=T (the T-step bound); else use mc")
    return methods


def parse_centres(values):
    """--mode_centres as an array [K, D]: numbers (1-D) or x:y pairs (2-D)."""
    import numpy as np

    try:
        return np.array([[float(c) for c in v.split(":")] for v in values], np.float64)
    except ValueError:
        raise app.UsageError(f"--mode_centres must be numbers or x:y pairs, got {values}")


def ode_divergence(num_dims: int) -> str:
    """--ode_divergence with auto resolved: the exact trace up to 16 dimensions, else Hutchinson."""
    if _ODE_DIVERGENCE.value != "auto":
        return _ODE_DIVERGENCE.value
    return "exact" if num_dims <= 16 else "hutchinson"


def terms_fn_of(method, setup, config, decoder, num_samples, chunk, images, num_dims, exact_T):
    """``vdm.bounds.elbo_terms`` of this model with the flags' settings; a class-conditional
    model's ``bounds.conditional_terms`` (its bound on -log p(x | y), each example's label)."""
    from vdm import bounds, build

    def terms_of_label(label=None):
        model_fn_of = lambda p: build.make_model_fn(setup.network, setup.process,  # noqa: E731
                                                    config.diffusion.time_input, p, labels=label)
        return bounds.elbo_terms(method, setup.process, model_fn_of, config.diffusion, decoder=decoder,
                                 num_samples=num_samples, chunk=chunk, exact_T=exact_T, ode_steps=_ODE_STEPS.value,
                                 ode_divergence=ode_divergence(num_dims), ode_probes=_ODE_PROBES.value,
                                 dequantize=images and not config.data.dequantize)

    return bounds.conditional_terms(terms_of_label) if setup.network.num_classes else terms_of_label()


def with_null_labels(batches, null_class: int):
    """--null_label: the batches with every label replaced by the null class."""
    import numpy as np

    for batch in batches:
        yield {**batch, "label": np.full_like(batch["label"], null_class)}


def draw_samples(setup, config, params, key, shape, images, sampler: str, num_steps: int, **guidance):
    """Samples of ``shape`` [n, ...] from the model, and the number of steps taken. ``guidance``:
    ``labels`` and ``guidance_scale`` of a class-conditional model, or a classifier ``guide``
    (``build.build_sampler``)."""
    import numpy as np

    from vdm import build

    steps = num_steps or build.sampling_steps(config.sample, config.diffusion)
    x = setup.sample(params, key, num_samples=shape[0], sampler=sampler, num_steps=steps,
                     spacing=_SPACING.value, options=sampler_options(config, sampler), clip_x0=images,
                     **guidance)
    return np.asarray(x), steps


def sampler_options(config, sampler: str) -> dict:
    """The config's sample.options when ``sampler`` is the config's sampler, and --eta for ddim."""
    options = dict(config.sample.get("options", {})) if sampler == config.sample.sampler else {}
    if _ETA.value is not None and sampler == "ddim":
        options["eta"] = _ETA.value
    return options


def sample_metrics(setup, config, params, key, dataset, batch_size, images, centres, sampler, num_steps):
    """One row of sample-quality metrics for a sampler and step count."""
    import jax
    import numpy as np

    from vdm import likelihood, toy_data
    from vdm.metrics import sample_quality

    n = _NUM_GENERATED.value
    samples, steps = draw_samples(setup, config, params, key, (n,) + tuple(dataset.data_shape), images,
                                  sampler, num_steps)
    from vdm import samplers

    row = {"sampler": sampler, "steps": steps, "nfe": samplers.num_evaluations(sampler, steps,
                                                                               sampler_options(config, sampler)),
           "num_samples": n}
    if images:
        real = np.concatenate([b["x"] for b in likelihood.epoch_batches(dataset, batch_size)])[:dataset.num_examples]
        row.update(image_sample_metrics(_WORKDIR.value, config, dataset, real, samples, _SEED.value))
        return row
    if config.data.source == "toy":
        fresh = toy_data.get(config.data.name).sample(np.random.default_rng([_SEED.value, 7]), n)
    else:  # vector data from a file: the split's own examples are the reference
        fresh = np.concatenate([b["x"].reshape((-1,) + tuple(dataset.data_shape))
                                for b in likelihood.epoch_batches(dataset, batch_size)])[:dataset.num_examples]
    row.update(sample_quality.toy_sample_metrics(jax.random.fold_in(key, 1), samples, fresh))
    if centres is not None:
        row["mode_centres"] = centres.tolist()
        row["mode_fractions"] = sample_quality.mode_fractions(samples, centres).tolist()
        row["mode_fractions_stderr"] = [math.sqrt(p * (1 - p) / n) for p in row["mode_fractions"]]
    return row


def image_sample_metrics(workdir, config, dataset, real, samples, seed):
    """Classifier Fréchet distance (and FID with --inception_weights) of image samples."""
    from vdm import data
    from vdm.metrics import classifier, inception, sample_quality

    out = {}
    if dataset.num_classes:
        train_ds = data.build_dataset(config.data, split="train", global_batch_size=128, seed=config.seed)

        def batch_fn(i):
            b = train_ds.get_batch(i)
            return (b["x"].reshape((-1,) + tuple(dataset.data_shape)), b["label"].reshape(-1))

        features = classifier.load_or_train_classifier(workdir, batch_fn, dataset.num_classes,
                                                       dataset.data_shape, num_steps=_CLASSIFIER_STEPS.value,
                                                       seed=seed)
        out["classifier_fd"] = sample_quality.classifier_frechet_distance(features, samples, real)
    else:
        print("classifier Fréchet distance skipped: the data set has no labels to train the classifier on")
    if _INCEPTION.value:
        try:
            features = inception.inception_features(_INCEPTION.value)
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(str(e))
        out["fid"] = sample_quality.classifier_frechet_distance(features, samples, real)
    else:
        print("FID skipped: pass --inception_weights=FILE (no weights are downloaded).\n"
              + inception.INCEPTION_WEIGHTS_HELP)
    return out


def scale_sweep(guided_model, scales, draw, score, name: str) -> list:
    """One row {guidance: name, scale, **score(samples)} per scale: ``guided_model(scale) -> model_fn``,
    ``draw(model_fn) -> samples``, ``score(samples) -> dict`` (e.g. ``labelled_sample_metrics``)."""
    rows = []
    for scale in scales:
        row = {"guidance": name, "scale": float(scale), **score(draw(guided_model(scale)))}
        rows.append(row)
        print(f"{name} guidance, scale {scale:g}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "scale"))
    return rows


def labelled_sample_metrics(config, dataset, real, labels):
    """``score(samples)`` for samples drawn with ``labels``: accuracy (the clean feature classifier's
    argmax equals the label; binomial stderr) and the classifier Fréchet distance to ``real``."""
    from vdm.metrics import classifier

    def score(samples):
        out = image_sample_metrics(_WORKDIR.value, config, dataset, real, samples, _SEED.value)
        hits = classifier.predicted_labels(_WORKDIR.value, samples, dataset.num_classes) == labels
        p = float(hits.mean())
        return {"accuracy": p, "accuracy_stderr": math.sqrt(p * (1 - p) / len(hits)), **out}

    return score


def load_guiding_classifier(dataset, images):
    """(classifier run, labels [n] cycling over the classes) for --classifier_workdir, checked against
    the data before anything is evaluated or sampled; None without the flag."""
    import numpy as np

    from vdm import noisy_classifier_train

    if not _CLASSIFIER_WORKDIR.value:
        return None
    if not images or not dataset.num_classes:
        raise app.UsageError("--classifier_workdir needs labelled image data")
    with cli.usage_errors():
        run = noisy_classifier_train.load_classifier(_CLASSIFIER_WORKDIR.value)
        if run.num_classes != dataset.num_classes:
            raise ValueError(f"the classifier in {_CLASSIFIER_WORKDIR.value} has {run.num_classes} classes, "
                             f"the data {dataset.num_classes}")
        labels = np.arange(_NUM_GENERATED.value) % run.num_classes
        noisy_classifier_train.check_guidance_inputs(run, dataset.data_shape, labels)
        scales = [float(v) for v in _CLASSIFIER_SCALES.value]
    return run, labels, scales


def classifier_guidance_sweep(setup, config, params, key, dataset, real, guiding):
    """``scale_sweep`` of the classifier of ``load_guiding_classifier`` over --classifier_scale."""
    from vdm import noisy_classifier_train

    run, labels, scales = guiding
    n = len(labels)
    sampler, steps = _SAMPLER.value[0], int(_SAMPLING_STEPS.value[0])

    def guided(scale):
        return lambda model_fn, p: noisy_classifier_train.guided_model_fn(model_fn, run, labels, scale,
                                                                          setup.process, p, config.diffusion)

    def draw(guide):
        return draw_samples(setup, config, params, key, (n,) + tuple(dataset.data_shape), True, sampler, steps,
                            guide=guide)[0]

    rows = scale_sweep(guided, scales, draw, labelled_sample_metrics(config, dataset, real, labels), "classifier")
    for r in rows:
        r.update(sampler=sampler, steps=steps, num_samples=n, classifier_step=run.step)
    return rows


def parse_guidance_scales(values) -> list:
    """--guidance_scale as floats >= 0."""
    try:
        scales = [float(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--guidance_scale must be numbers >= 0, got {values}")
    if any(not (w >= 0 and math.isfinite(w)) for w in scales):
        raise app.UsageError(f"--guidance_scale must be finite numbers >= 0, got {values}")
    return scales


def check_guidance_sweep(setup, dataset) -> None:
    """--guidance_scale needs a class-conditional model of image data (the classifier's)."""
    if not setup.network.num_classes:
        raise app.UsageError("--guidance_scale needs a class-conditional model (config.data.conditional = True)")
    if len(dataset.data_shape) != 3:
        raise app.UsageError("--guidance_scale scores samples with the image feature classifier; the data are "
                             f"{dataset.data_shape}-shaped vectors")


def guidance_row(w, labels, predicted, fd_features, real_features, key) -> dict:
    """Accuracy at the requested label (binomial standard error) and the classifier FD of one w,
    with the standard deviation of the FD over bootstrap resamples of the generated samples."""
    import numpy as np

    from vdm.metrics import sample_quality

    n = len(labels)
    acc = float(np.mean(predicted == labels))
    rng = np.random.default_rng(key)
    boot = [sample_quality.frechet_distance_of_features(fd_features[rng.integers(0, n, n)], real_features)
            for _ in range(_BOOTSTRAP.value)]
    return {"guidance_scale": w, "num_samples": n, "accuracy": acc, "accuracy_stderr": math.sqrt(acc * (1 - acc) / n),
            "classifier_fd": sample_quality.frechet_distance_of_features(fd_features, real_features),
            "classifier_fd_bootstrap_std": float(np.std(boot, ddof=1)) if len(boot) > 1 else float("nan")}


def guidance_sweep(setup, config, params, key, dataset, batch_size, scales) -> dict:
    """Guided samples at each w: accuracy and classifier FD vs w (module docstring), the table,
    guidance.png and one grid per w."""
    import numpy as np

    from vdm import data, likelihood, viz
    from vdm.metrics import classifier

    k, n = setup.network.num_classes, _NUM_GENERATED.value
    train_ds = data.build_dataset(config.data, split="train", global_batch_size=128, seed=config.seed)

    def batch_fn(i):
        b = train_ds.get_batch(i)
        return (b["x"].reshape((-1,) + tuple(dataset.data_shape)), b["label"].reshape(-1))

    fns = {o: classifier.load_or_train_classifier(_WORKDIR.value, batch_fn, k, dataset.data_shape,
                                                  num_steps=_CLASSIFIER_STEPS.value, seed=_SEED.value, output=o)
           for o in ("features", "labels")}
    batches = list(likelihood.epoch_batches(dataset, batch_size))
    real = np.concatenate([b["x"] for b in batches])[:dataset.num_examples]
    real_labels = np.concatenate([b["label"] for b in batches])[:dataset.num_examples]
    real_acc = float(np.mean(fns["labels"](real) == real_labels))
    real_features = fns["features"](real)
    sampler, steps = _SAMPLER.value[0], int(_SAMPLING_STEPS.value[0])
    labels = np.arange(n, dtype=np.int32) % k
    rows = []
    for i, w in enumerate(scales):
        samples, steps = draw_samples(setup, config, params, key, (n,) + tuple(dataset.data_shape), True, sampler,
                                      steps, labels=labels, guidance_scale=w)
        rows.append(guidance_row(w, labels, fns["labels"](samples), fns["features"](samples), real_features,
                                 [_SEED.value, i]))
        per_class = np.concatenate([samples[labels == c][:10] for c in range(k)])
        viz.save_image_grid(os.path.join(_WORKDIR.value, f"guidance_w{w:g}.png"), per_class,
                            nrow=min(10, n // k), scale=viz.display_scale(dataset.data_shape[0]))
    print(f"classifier-free guidance: {n} samples per w ({sampler}, {steps} steps; "
          f"sample i of class i mod {k}); classifier accuracy on the real {_SPLIT.value} split {real_acc:.4f}")
    print(f"{'w':>6} {'accuracy':>10} {'(stderr)':>9} {'classifier FD':>14} {'(bootstrap std)':>16}")
    for r in rows:
        print(f"{r['guidance_scale']:>6g} {r['accuracy']:>10.4f} {r['accuracy_stderr']:>9.4f} "
              f"{r['classifier_fd']:>14.4f} {r['classifier_fd_bootstrap_std']:>16.4f}")
    path = viz.plot_ablation(os.path.join(_WORKDIR.value, "guidance.png"),
                             [dict(r, sampler=sampler) for r in rows], ["accuracy", "classifier_fd"],
                             label="sampler", x="guidance_scale",
                             title="classifier-free guidance: accuracy and classifier FD vs w")
    print(f"wrote {path} and guidance_w<w>.png (10 samples per class, one row per class)")
    return {"sampler": sampler, "steps": steps, "real_accuracy": real_acc,
            "real_accuracy_stderr": math.sqrt(real_acc * (1 - real_acc) / len(real_labels)),
            "accuracy_estimator": "fraction of samples the feature classifier labels as requested; binomial stderr",
            "fd_estimator": "Fréchet distance of classifier features to the split; std over bootstrap resamples "
                            "of the generated samples", "rows": rows}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import jax
    import numpy as np

    from vdm import baselines, build, checkpoints, data, likelihood
    from vdm import objective as objective_lib
    from vdm.metrics import inception

    workdir = _WORKDIR.value
    with cli.usage_errors():
        config = _CONFIG.value or checkpoints.load_run_config(workdir)
    ev = config.eval
    batch_size = _BATCH.value or ev.batch_size
    num_samples = _NUM_SAMPLES.value or ev.elbo_samples
    dataset = data.build_dataset(config.data, split=_SPLIT.value, global_batch_size=batch_size,
                                 seed=config.seed)
    setup = build.build_setup(config, dataset)
    exact_T = _EXACT_T.value or config.diffusion.T
    methods = elbo_methods(_ELBO.value, setup.process.discrete, 0 if setup.process.discrete else exact_T)
    centres = parse_centres(_MODES.value) if _MODES.value else None
    scales = parse_guidance_scales(_GUIDANCE.value) if _GUIDANCE.value else None
    if scales is not None:
        check_guidance_sweep(setup, dataset)
    images = len(dataset.data_shape) == 3
    if _INCEPTION.value and not os.path.isfile(_INCEPTION.value):
        raise app.UsageError(f"--inception_weights={_INCEPTION.value!r} does not exist.\n"
                             + inception.INCEPTION_WEIGHTS_HELP)
    guiding = load_guiding_classifier(dataset, images)
    with cli.usage_errors():
        params, step = checkpoints.restore_params(workdir, config.train, _STEP.value, _RAW.value)
    key = jax.random.PRNGKey(_SEED.value)

    decoder = objective_lib.decoder_for(config.loss, dataset.is_discrete_8bit)
    num_dims = int(np.prod(dataset.data_shape)) if images else None
    result = {"workdir": workdir, "checkpoint_step": step, "split": _SPLIT.value,
              "params": "raw" if _RAW.value else "ema", "elbo": {}}
    dims = int(np.prod(dataset.data_shape))
    conditional = bool(setup.network.num_classes)
    if _NULL_LABEL.value and not conditional:
        raise app.UsageError("--null_label needs a class-conditional model (config.data.conditional = True)")
    for m in methods:
        terms_fn = terms_fn_of(m, setup, config, decoder, num_samples, _CHUNK.value or ev.elbo_chunk, images, dims,
                               exact_T)
        if m == "ode":
            probes = (f"Hutchinson, {_ODE_PROBES.value} Rademacher probes" if ode_divergence(dims) == "hutchinson"
                      else "exact divergence")
            label = (f"probability-flow ODE, {_ODE_STEPS.value} Heun steps, {probes}"
                     + (", uniform dequantization" if images else ""))
        elif m == "exact" and not setup.process.discrete:
            label = f"exact sum over the T = {exact_T} terms of the T-step bound (eq. 15)"
        else:
            label = "exact sum over T terms" if m == "exact" else f"Monte Carlo, {num_samples} draws per example"
            if m == "mc" and not setup.process.discrete:
                label += " (low-discrepancy times)"
        if conditional:
            label += ("; class-conditional model, its null class: -log p(x)" if _NULL_LABEL.value
                      else "; class-conditional, -log p(x | y) with each example's label")
        batches = likelihood.epoch_batches(dataset, batch_size)
        if conditional and _NULL_LABEL.value:
            batches = with_null_labels(batches, setup.network.num_classes)
        r = likelihood.negative_elbo(terms_fn, params, batches,
                                   jax.random.fold_in(key, len(result["elbo"])), num_dims=num_dims,
                                   log_prob_fn=None if conditional else dataset.log_prob,
                                   max_batches=_MAX_BATCHES.value or None,
                                   method=label, dequantized=images and (config.data.dequantize or m == "ode"),
                                   quantity="negative log-likelihood" if m == "ode" else "negative ELBO",
                                   labels=conditional)
        result["elbo"][m] = r
        print(likelihood.format_table(r), end="\n\n")
    if images:  # the best factorized model of the same split, beside the diffusion bound
        train_ds = data.build_dataset(config.data, split="train", global_batch_size=batch_size, seed=config.seed)
        ref = baselines.reference_bpd(likelihood.epoch_batches(train_ds, batch_size),
                                      likelihood.epoch_batches(dataset, batch_size))
        result["pixel_baseline"] = ref
        print(f"per-pixel categorical baseline (add-{ref['alpha']:g} smoothing chosen by leave-one-out on "
              f"{ref['num_train']} training images): {ref['mean']:.5f} (stderr {ref['stderr']:.5f}) "
              f"bits/dim on {_SPLIT.value}\n")
    if "exact" in result["elbo"] and "mc" in result["elbo"] and setup.process.discrete:
        # (continuous time: exact is the T-step bound, which lies above the continuous one)
        a, b = (result["elbo"][m]["terms"]["total"] for m in ("exact", "mc"))
        diff = {"mean": a["mean"] - b["mean"], "stderr_mc": b["stderr"]}
        diff["within_stderr"] = abs(diff["mean"]) <= b["stderr"]
        result["exact_minus_mc"] = diff
        print(f"exact - mc = {diff['mean']:+.5f} (mc stderr {b['stderr']:.5f}; "
              f"{'within' if diff['within_stderr'] else 'outside'} one standard error)\n")

    if _VARIANCE_DRAWS.value:
        if setup.process.discrete:
            raise app.UsageError("--estimator_variance_draws needs a continuous-time model")
        model_fn_of = lambda p: build.make_model_fn(setup.network, setup.process, config.diffusion.time_input, p)
        r = likelihood.vdm_estimate_variance(model_fn_of, setup.process.log_snr, params,
                                             likelihood.epoch_batches(dataset, batch_size), jax.random.fold_in(key, 99),
                                             _VARIANCE_DRAWS.value, T=config.diffusion.T,
                                             parameterization=config.diffusion.parameterization, decoder=decoder,
                                             num_dims=num_dims, max_batches=_MAX_BATCHES.value or None)
        result["estimator_variance"] = r
        for name, v in r["terms"].items():
            print(f"variance of the one-draw estimate, {name}: {v['mean']:.4g} +- {v['stderr']:.2g} {r['unit']}")

    if _SAMPLE_METRICS.value:
        from vdm import viz

        rows = []
        for i, (sampler, steps) in enumerate((a, int(b)) for a in _SAMPLER.value for b in _SAMPLING_STEPS.value):
            row = sample_metrics(setup, config, params, jax.random.fold_in(key, 1000 + i), dataset, batch_size,
                                 images, centres, sampler, steps)
            rows.append(row)
            print(f"sample quality ({sampler}, {row['steps']} steps, {row['num_samples']} samples)")
            for k, v in row.items():
                if k not in ("sampler", "steps", "nfe", "num_samples"):
                    print(f"  {k:<22}{v}")
        result["samples"] = rows
        metrics = [k for k in ("classifier_fd", "fid", "mmd", "sliced_wasserstein") if k in rows[0]]
        if len(rows) > 1 and not metrics:
            print("sample_quality.png skipped: no sample metric to plot (unlabelled images without "
                  "--inception_weights)")
        elif len(rows) > 1:
            path = viz.plot_ablation(os.path.join(workdir, "sample_quality.png"), rows, metrics, label="sampler",
                                     x="nfe", log_x=True, title="sample quality vs network evaluations")
            print(f"wrote {path}")

    if scales is not None:
        result["guidance"] = guidance_sweep(setup, config, params, jax.random.fold_in(key, 2000), dataset,
                                            batch_size, scales)
    if guiding is not None:
        from vdm import viz

        real = np.concatenate([b["x"] for b in likelihood.epoch_batches(dataset, batch_size)])[:dataset.num_examples]
        rows = classifier_guidance_sweep(setup, config, params, jax.random.fold_in(key, 2000), dataset, real, guiding)
        result["classifier_guidance"] = rows
        path = viz.plot_ablation(os.path.join(workdir, "classifier_guidance.png"), rows,
                                 ["accuracy", "classifier_fd"], label="guidance", x="scale",
                                 title="guided samples: accuracy and Fréchet distance vs scale")
        print(f"wrote {path}")

    out = _OUT.value or os.path.join(workdir, f"eval_{_SPLIT.value}.json")
    print(f"wrote {likelihood.save_json(out, result)}")


if __name__ == "__main__":
    cli.run(main)
