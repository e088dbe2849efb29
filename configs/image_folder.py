"""Seed 001: train on a folder of images (png/jpg, resized and centre-cropped to 128x128).

    python scripts/train.py --config=configs/image_folder.py --workdir=runs/folder \
        --config.data.path=/path/to/images

The seed's starter UNet (dim 64, mults 1,2,4,8), T = 1000, L1 loss, 250
accelerated sampling steps, gradient accumulation over 2 batches, EMA
0.995, lr 8e-5; --config.model.dtype=bfloat16 for mixed precision. Every
file is decoded once at start: unreadable ones stop the run with their
names, or are skipped with --config.data.skip_bad_files=True.
Expected: on one GPU, blurry shapes after ~10k steps and
recognisable images of a few thousand-image folder after ~100k.
"""
from vdm import config as config_lib
from vdm.models import presets


def get_config():
    config = config_lib.defaults()
    config.data.update(dict(source="folder", path="", image_size=128, channels=3, random_flip=True,
                            num_test=16))
    config.model = presets.lucidrains_unet64(128)
    config.diffusion.update(dict(schedule="linear", T=1000))
    config.loss.update(dict(loss_type="l1"))
    config.optim.update(dict(lr=8e-5, warmup_steps=500, decay="constant", accum_steps=2, ema_decay=0.995))
    config.train.update(dict(num_steps=700000, batch_size=32, log_every=100, checkpoint_every=5000))
    config.eval.update(dict(every=5000, batch_size=16, num_batches=1))
    config.sample.update(dict(num_samples=16, num_steps=250))
    return config
