"""Smoke test of scripts/benchmark.py at toy sizes: FLOP counting, timing records, the UNet sections.

No timing is asserted; the FLOP counts are checked against closed forms and XLA's own count.
"""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_of_matmul_conv_and_scan_match_closed_forms(bench):
    a, b = jnp.ones((3, 5)), jnp.ones((5, 7))
    assert bench.count_flops(jnp.matmul, a, b) == 2 * 3 * 5 * 7
    x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 8))
    fwd = 2 * 2 * 6 * 6 * 8 * 3 * 3 * 4
    assert bench.count_flops(bench.conv3x3, x, w) == fwd
    # Forward + both gradients are three convolutions of the same cost.
    grads = jax.grad(lambda x, w: jnp.sum(bench.conv3x3(x, w) ** 2), argnums=(0, 1))
    assert bench.count_flops(grads, x, w) == 3 * fwd
    # A scan body counts once per iteration; XLA's estimate counts it once in all.
    scanned = lambda a: jax.lax.scan(lambda c, _: (c @ c, None), a, None, length=4)[0]
    assert bench.count_flops(scanned, jnp.ones((8, 8))) == 4 * 2 * 8 ** 3


def test_flops_agree_with_xla_on_a_conv_gradient(bench):
    # VALID padding: XLA's estimate leaves out products with 'SAME' padding zeros, ours counts them.
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    f = jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2))
    xla = bench.compiled_stats(jax.jit(f).lower(w).compile())["xla_flops"]
    # XLA adds a few elementwise FLOPs (the squares and sums) to the two convolutions.
    assert bench.count_flops(f, w) <= xla < 1.1 * bench.count_flops(f, w)


def test_interleaved_timing_and_conv_limits_report_ordered_statistics(bench):
    pending = {"conv": bench.bench_conv(2, 8, 8, "float32"), "matmul": bench.bench_matmul(16, "float32")}
    r = bench.run_interleaved(pending, repeats=3)["conv"]
    assert all(len(t.times) == 3 for p in pending.values() for t in p.timers)  # one call each per round
    for name in ("forward+backward", "forward+backward unet", "forward", "backward_input", "backward_kernel"):
        g = r[name]["gflops"]
        assert 0 < g["min"] <= g["median"] <= g["max"]
        assert r[name]["compile_s"] > 0 and r[name]["xla_peak_bytes"] > 0
    assert r["forward+backward"]["flops"] == 3 * r["forward"]["flops"] == 3 * r["backward_kernel"]["flops"]
    assert r["forward+backward unet"]["flops"] == r["forward+backward"]["flops"]


def test_unet_sections_run_the_real_train_step_sampler_and_elbo(bench):
    ub = bench.UNetBench(32, (1,), batch=2, image_shape=(8, 8, 3), attn_resolutions=(), T=50)
    done = bench.run_interleaved({"train": bench.bench_train(ub), "forward": bench.bench_forward(ub, 2),
                                  "ddim": bench.bench_sampler(ub, "ddim", 2, steps=2, compile_steps=5),
                                  "elbo": bench.bench_elbo(ub, batch=1, chunk=25)}, repeats=1)
    train, fwd, smp, elbo = (done[k] for k in ("train", "forward", "ddim", "elbo"))
    # Training executes forward + input gradient + kernel gradient (the first conv's input
    # gradient is not needed), so between 2x and 3x the forward's FLOPs per image.
    per_image_fwd = fwd["flops"] / 2
    assert 2 * per_image_fwd < train["gflop_per_image"] * 1e9 <= 3 * per_image_fwd
    assert smp["flops"] == 2 * fwd["flops"]  # one network call per step
    assert elbo["flops"] == 50 * fwd["flops"] / 2  # T = 50 network evaluations of one image
    rows = bench.unet_rows("toy", {"train": train, "forward": fwd, "samplers": {"ddim": smp},
                                   "elbo": {**elbo, "forward": fwd}}, conv_limits={"matmul": 1.0}, peak=None)
    json.dumps(rows)  # the report is plain JSON
    assert {"train toy / matmul", "ddim toy step / forward"} <= {r["what"] for r in rows}
    assert np.isfinite(smp["step_over_forward"]["median"])  # a difference of timings: its sign is noise at this size


def test_bad_arguments_are_refused(bench, monkeypatch):
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "limits,bogus"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "huge"])
    monkeypatch.setattr(jax, "local_device_count", lambda: 2)  # the sampler splits its batch over them
    with pytest.raises(SystemExit, match="--sample-batch 3 must be divisible by the 2 local devices"):
        bench.main(["--only=sample", "--sizes=small", "--sample-batch=3"])


def test_main_runs_every_section_at_tiny_size(bench, tmp_path, monkeypatch):
    """benchmark.main() end to end with the UNet sections' flags, on a tiny UNet size added for
    the test: each section writes its timing records to the JSON and a row to the table (the
    ELBO section, at T = 1000 here, is run at T = 50 by the test above)."""
    monkeypatch.setitem(bench.UNET_SIZES, "tiny", (32, (1, 2), 2))  # 32 channels: 32 GroupNorm groups
    out = tmp_path / "bench.json"
    results = bench.main(["--dtype=float32", "--repeats=1", "--only=limits,train,sample", "--sizes=tiny",
                          "--train-batch=2", "--steps-per-call=2", "--samplers=ddim", "--sample-steps=2",
                          "--sample-batch=3", "--compile-steps=3", "--matmul-size=32", f"--json={out}"])
    saved = json.load(open(out))
    assert saved["unet"]["tiny"].keys() == results["unet"]["tiny"].keys() >= {"num_params", "train", "forward",
                                                                              "samplers"}
    assert set(saved["unet"]["tiny"]["samplers"]) == {"ddim"} and set(saved["limits"]) == {"matmul", "conv"}
    assert saved["repeats"] == 1 and saved["dtype"] == "float32"
    ddim = saved["unet"]["tiny"]["samplers"]["ddim"]
    assert ddim["batch"] == saved["unet"]["tiny"]["forward"]["batch"] == 3
    assert ddim["seconds_double"]["min"] > 0  # the 2 x --sample-steps run, timed whole


def test_input_section_times_every_source_at_each_worker_count(bench, tmp_path):
    """--only input at tiny size: images/s and the speed-up over one worker for each source and
    worker count, in the JSON and the table; bad worker lists are refused."""
    folder = bench.make_jpeg_folder(str(tmp_path / "jpeg"), count=20, size=16)
    out = tmp_path / "input.json"
    results = bench.main(["--only=input", "--repeats=1", "--input-workers=1,2", "--input-batches=1",
                          f"--jpeg-folder={folder}", f"--json={out}"])
    saved = json.load(open(out))
    assert set(saved["input"]) == set(results["input"]) == {"digits 8x8", "tfds celeb_a mock 218x178 -> 64",
                                                             "jpeg folder 128 px"}
    for r in saved["input"].values():
        assert set(r["workers"]) == {"1", "2"}
        assert all(0 < w["images_per_s"]["min"] <= w["images_per_s"]["max"] for w in r["workers"].values())
        assert r["workers"]["1"]["speedup"]["median"] == 1.0
    for bad in (["--input-workers=0"], ["--input-workers=a"], ["--overlap-steps=15"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_compare_peer_variants_split_arguments_environment_and_checkout():
    spec = importlib.util.spec_from_file_location("compare_peer", os.path.join(ROOT, "scripts", "compare_peer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    name, args, env = module.parse_variant("2dev=--cpu-devices=2 XLA_FLAGS=--xla_x=1 repo=/tmp/old --repeats 3")
    assert (name, args) == ("2dev", ["--cpu-devices=2", "--repeats", "3"])
    assert env == {"XLA_FLAGS": "--xla_x=1", "repo": "/tmp/old"}
    assert module.parse_variant("plain=") == ("plain", [], {})
