"""Test configuration: import `vdm` from the repository root without installing it."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The suite's time goes mostly to compiling many small programs. XLA:CPU's older loop emitters
# compile them about twice as fast as its default fusion emitters (a tiny config-matrix run of
# tests/config_worker.py: 1.0 against 2.0 s; test_samplers, test_losses and test_paths: 96
# against 122 s), so the tests and their subprocesses run with them. Set before JAX starts.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test subprocess: the fast-compile flag and ``devices`` CPU devices."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"


def make_image_folder(root) -> tuple:
    """A folder of real PNG/JPEG files in sub-folders (RGB, grey, RGBA, several sizes) plus
    broken ones; returns (folder, names of the broken files)."""
    rng = np.random.default_rng(0)
    for i in range(10):
        sub = os.path.join(root, f"class_{i % 2}", "deeper" if i % 3 == 0 else "")
        os.makedirs(sub, exist_ok=True)
        size = (12 + i, 10 + 2 * i)
        mode = ("RGB", "L", "RGBA")[i % 3]
        array = rng.integers(0, 256, size[::-1] + ((3,) if mode == "RGB" else (4,) if mode == "RGBA" else ()))
        image = Image.fromarray(array.astype(np.uint8), mode)
        ext = "png" if i % 2 else "jpg"
        image.convert("RGB" if ext == "jpg" else mode).save(os.path.join(sub, f"img{i}.{ext}"))
    broken = ["class_0/not_an_image.png", "class_1/truncated.jpg", "empty.jpeg"]
    with open(os.path.join(root, broken[0]), "w") as f:
        f.write("this is text, not a PNG")
    good_jpg = os.path.join(root, "class_0", "deeper", "img0.jpg")
    with open(good_jpg, "rb") as f, open(os.path.join(root, broken[1]), "wb") as g:
        g.write(f.read()[:200])
    open(os.path.join(root, broken[2]), "wb").close()
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("not an image suffix: ignored")
    return str(root), broken


@pytest.fixture
def winograd_calls(monkeypatch):
    """Force ``vdm.models.cpu_conv``'s Winograd path whatever this CPU is, and record each traced
    ``winograd`` call as (function name, input shape)."""
    from vdm.models import cpu_conv, winograd
    calls = []

    def spy(name):
        original = getattr(winograd, name)

        def recorded(x, other):
            calls.append((name, x.shape))
            return original(x, other)
        monkeypatch.setattr(winograd, name, recorded)

    monkeypatch.setattr(cpu_conv, "winograd_pays", lambda: True)
    spy("conv3x3")
    spy("kernel_grad3x3")
    return calls
