"""Speed benchmark: machine limits, UNet training, samplers and the exact ELBO.

One process, one run. Every figure is timed over ``--repeats`` calls of an
ahead-of-time compiled function after one warm-up call, and reported as
min/median/max; compile time is measured separately (``lower`` + ``compile``).

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
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SECTIONS = ("limits", "train", "sample", "elbo")
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
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


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


def measure(fn: Callable, *args, repeats: int, carry: bool = False, jit_kwargs: dict | None = None) -> dict:
    """Compile ``fn`` ahead of time, run it once to warm up, then time ``repeats`` calls.

    With ``carry`` the function returns ``(new_first_arg, extra)`` and the first
    argument is threaded through the calls (a train state, possibly donated).
    Returns compile seconds, per-call seconds (min/median/max), matmul/conv FLOPs
    per call, XLA's FLOP estimate and peak bytes.
    """
    flops = count_flops(fn, *args)
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **(jit_kwargs or {}))
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    args = list(args)

    def call():
        out = compiled(*args)
        jax.block_until_ready(out)
        if carry:
            args[0] = out[0]

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "seconds": summary(times), "flops": flops,
            **compiled_stats(compiled), "device_peak_bytes": device_peak_bytes()}


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


def bench_matmul(n: int, dtype: str, repeats: int) -> dict:
    """[n, n] @ [n, n] in ``dtype`` (float32 accumulation where the backend does it)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    r = measure(jnp.matmul, a, b, repeats=repeats)
    return {**r, "gflops": rate(r, r["flops"] / 1e9), "shape": [n, n, n]}


def bench_conv(batch: int, size: int, channels: int, dtype: str, repeats: int) -> dict:
    """3x3 conv forward + backward (input and kernel gradients) and each of the three passes alone."""
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (batch, size, size, channels), dtype)
    w = (jax.random.normal(kw, (3, 3, channels, channels)) / np.sqrt(9 * channels)).astype(dtype)
    dy = jax.random.normal(ky, x.shape, dtype)

    def fwd_bwd(x, w, dy):
        y, vjp = jax.vjp(conv3x3, x, w)
        return y, vjp(dy)

    passes = {"forward+backward": fwd_bwd,
              "forward": lambda x, w, dy: conv3x3(x, w),
              "backward_input": lambda x, w, dy: jax.linear_transpose(lambda x: conv3x3(x, w), x)(dy),
              "backward_kernel": lambda x, w, dy: jax.linear_transpose(lambda w: conv3x3(x, w), w)(dy)}
    out = {"shape": [batch, size, size, channels]}
    for name, fn in passes.items():
        r = measure(fn, x, w, dy, repeats=repeats)
        out[name] = {**r, "gflops": rate(r, r["flops"] / 1e9)}
    return out


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


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


def limits_rows(limits: dict) -> list[dict]:
    m, c = limits["matmul"], limits["conv"]
    rows = [row(f"matmul {'x'.join(map(str, m['shape']))}", fmt(m["gflops"]), "GFLOP/s", m)]
    for name in ("forward+backward", "forward", "backward_input", "backward_kernel"):
        rows.append(row(f"conv3x3 {name} {'x'.join(map(str, c['shape']))}", fmt(c[name]["gflops"]),
                        "GFLOP/s", c[name]))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per figure (after one warm-up)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n x n matmul (default 2048 CPU, 8192 GPU)")
    p.add_argument("--json", default="benchmark.json", help="where to write the results")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {bad}; allowed: {', '.join(SECTIONS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    info = device_info()
    results: dict[str, Any] = {"device": info, "dtype": args.dtype, "repeats": args.repeats,
                               "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    print(f"device: {info['backend']} {info['device_kind']} x{info['device_count']} | host {info['host_cpu']} "
          f"({info['host_cores']} cores) | jax {info['jax']} | dtype {args.dtype} | "
          f"{args.repeats} timed calls per figure, median [min, max]")
    rows: list[dict] = []
    if "limits" in args.only:
        n = args.matmul_size or (2048 if info["backend"] == "cpu" else 8192)
        results["limits"] = {"matmul": bench_matmul(n, args.dtype, args.repeats),
                             "conv": bench_conv(32, 32, 128, args.dtype, args.repeats)}
        rows += limits_rows(results["limits"])
    print(table(rows))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
