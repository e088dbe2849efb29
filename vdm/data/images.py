"""8-bit images: listing and decoding files, checking a folder, fitting and padding (uint8 NHWC).

Image scaling. Fitting to ``image_size`` (if > 0 and the image is not already that
size) scales the shorter side to ``image_size`` (bicubic, antialiased) and crops the
centre square; ``pad_to`` (if > 0) then pads with zeros (black, x = -1) to
``pad_to x pad_to``; ``random_flip`` flips training examples left-right with
probability 1/2. A pixel k in 0..255 becomes x = k / 127.5 - 1. With ``dequantize``,
x = (k + u - 1/2) / 127.5 - 1 with u ~ U(0, 1): uniform over the bin of width 2/255
centred on the grid point, the bin the discretized decoder integrates over (Ho et al.
2020, eq. 13). By Jensen, -log2 P(k) <= -log2 p(x) - D log2(2/255) for a continuous
density p, so bits/dim on the discrete data <= continuous bits/dim + log2(127.5).
(The flip, scaling and dequantization are applied per example by ``vdm.data.dataset``.)
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib
from typing import Optional

import numpy as np
from PIL import Image

from vdm.data.config import error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_labels(root, files) -> tuple[np.ndarray, tuple]:
    """(labels [n], class names): a file's class is its top-level sub-folder under ``root``,
    the classes numbered in sorted name order (torchvision's ImageFolder convention). A file
    directly under ``root`` has no class: ValueError naming it."""
    root = pathlib.Path(root)
    tops = [pathlib.Path(f).relative_to(root).parts for f in files]
    loose = [os.path.join(*t) for t in tops if len(t) == 1]
    if loose:
        raise ValueError(f"{len(loose)} image(s) directly under {str(root)!r} have no class sub-folder "
                         f"(e.g. {loose[0]!r}); put every image in <path>/<class>/...")
    names = tuple(sorted({t[0] for t in tops}))
    index = {name: k for k, name in enumerate(names)}
    return np.array([index[t[0]] for t in tops], np.int32), names


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Scales the shorter side to `size` (bicubic, antialiased) and crops the centre square."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def fit_array(image: np.ndarray, size: int) -> np.ndarray:
    """fit_image for a uint8 [H, W, C] array (C = 1 or 3)."""
    if size == 0 or image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return np.asarray(fit_image(pil, size)).reshape(size, size, image.shape[-1])


def pad(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads uint8 [N, H, W, C] images (centred) to [N, size, size, C]."""
    h, w = images.shape[1:3]
    if size == 0 or (h, w) == (size, size):
        return images
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def decode(path, mode: str) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image if image.mode == mode else image.convert(mode)


def _read_error(path, mode: str) -> Optional[str]:
    try:
        decode(path, mode)
    except BAD_IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_image_files(files, channels: int, workers: Optional[int] = None) -> dict:
    """{file: error} for every file of ``files`` that PIL cannot open and decode as an image,
    checked by a thread pool (decoding releases the GIL)."""
    mode = "RGB" if channels == 3 else "L"
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        errors = pool.map(lambda f: _read_error(f, mode), files)
        return {f: e for f, e in zip(files, errors) if e is not None}


_CHECKED_FOLDERS: dict = {}  # (files with size and mtime, channels, skip) -> readable files


def readable_image_files(cfg) -> list:
    """The folder's image files after one decode pass (once per process while no file changes:
    the train and test splits share it); raises naming the bad files unless
    ``cfg.skip_bad_files``, which leaves them out with one warning."""
    files = image_files(pathlib.Path(cfg.path))
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (stats, cfg.channels, cfg.skip_bad_files)
    if key not in _CHECKED_FOLDERS:
        bad = check_image_files(files, cfg.channels)
        listing = "\n".join(f"  {os.path.relpath(f, cfg.path)}: {e}" for f, e in bad.items())
        if bad and not cfg.skip_bad_files:
            raise error("path", f"{len(bad)} of {len(files)} files under {cfg.path!r} are not readable "
                                f"images:\n{listing}\nremove them, or set config.data.skip_bad_files=True "
                                "to train without them")
        if bad:
            logging.warning("skipping %d of %d files under %r that are not readable images:\n%s",
                            len(bad), len(files), cfg.path, listing)
        good = [f for f in files if f not in bad]
        if not good:
            raise error("path", f"none of the {len(files)} files under {cfg.path!r} is a readable image")
        _CHECKED_FOLDERS[key] = good
    return _CHECKED_FOLDERS[key]


class Folder:
    """Images of a list of checked files, with their ``labels`` (class sub-folders) or None. A
    file that fails to decode later (changed on disk) is logged once and replaced by the next
    readable file of the list, with that file's label."""

    def __init__(self, files, size: int, channels: int, labels=None):
        self.files, self.size, self.mode = files, size, "RGB" if channels == 3 else "L"
        self.labels, self.failed = labels, set()

    def __len__(self):
        return len(self.files)

    def _image(self, i: int) -> tuple[np.ndarray, int]:
        """(image, the index of the file it came from)."""
        for j in range(len(self.files)):
            k = (i + j) % len(self.files)
            path = self.files[k]
            if path in self.failed:
                continue
            try:
                fitted = fit_image(decode(path, self.mode), self.size)
            except BAD_IMAGE_ERRORS as e:
                self.failed.add(path)
                logging.warning("skipping %s, which became unreadable during the run: %s: %s",
                                path, type(e).__name__, e)
                continue
            return np.asarray(fitted).reshape(self.size, self.size, -1), k
        raise OSError(f"no file of the image folder is readable any more ({len(self.files)} files)")

    def load(self, indices):
        images, used = zip(*[self._image(int(i)) for i in indices])
        return np.stack(images), None if self.labels is None else self.labels[list(used)]
