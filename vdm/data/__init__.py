"""Every data source behind one batch interface.

Interface (all a training or evaluation loop needs)::

    from vdm import data
    cfg = data.default_config()      # the config's `data` section; set fields, e.g. cfg.source = "tfds"
    ds = data.build_dataset(cfg, split="train", global_batch_size=128, seed=0)
    batch = ds.get_batch(step)       # {"x": float32 [L, b, *ds.data_shape], "label": int32 [L, b]}
    for batch in ds.iterate_epoch(256):  # the split once, in order; adds "mask": bool [L, b]
        ...

``ds.close()`` ends the decoding threads of an image folder or TFDS source.
``L`` is the number of local devices and ``b = global_batch_size / (process_count * L)``.
``"label"`` is present iff ``ds.num_classes > 0``. Other attributes: ``data_shape``
(NHWC without the batch axis for images, ``(D,)`` for toy data), ``num_classes``,
``is_discrete_8bit`` (x lies on the 256-level grid ``k / 127.5 - 1``: an image source
with ``dequantize`` off; use the discretized decoder), ``num_examples`` (``None`` for an
infinite toy stream) and ``log_prob`` (the exact log-density of a toy distribution, a
jnp function ``x [..., D] -> [...]``, else ``None``).

Layout: ``config`` (the `data` section: fields, defaults, shared checks), ``registry``
(source name -> opener and config check), ``splits`` (fixed random streams, the held-out
split), ``images`` (image files, decoding, fitting, padding; the image scaling and
dequantization), ``sources`` (the sources, each registered beside its definition) and
``dataset`` (``Dataset``: determinism, sharding, workers; ``build_dataset``). Adding a
source is an opener in ``sources`` with its ``@register(name, check=...)`` line.
"""
from vdm.data import sources  # registers the sources
from vdm.data.config import default_config, validate_config
from vdm.data.dataset import Dataset, build_dataset, num_workers
from vdm.data.images import BAD_IMAGE_ERRORS, IMAGE_SUFFIXES, check_image_files, fit_image
from vdm.data.registry import REGISTRY, Opened, register
from vdm.data.splits import DATA_SEED, SPLITS

SOURCES = tuple(REGISTRY)
