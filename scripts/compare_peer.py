"""This library against the PyTorch peer (denoising-diffusion-pytorch) on this machine, as ratios.

Alternating rounds, each side in a fresh process: every round runs the peer's harness
(``../shared/peer/bench_peer.py``, in its own virtual environment) and ``scripts/benchmark.py``
once per variant of this library, in a rotated order, so that a change in the machine's load
hits all sides. A variant is a name and the arguments of its ``benchmark.py`` run; tokens
``NAME=VALUE`` with an upper-case NAME are environment variables instead (e.g. ``XLA_FLAGS``),
and ``repo=PATH`` runs ``PATH/scripts/benchmark.py`` (another checkout, e.g. an older commit
unpacked with ``git archive``) instead of this one's.

    python scripts/compare_peer.py --rounds 3 --variant plain= --variant 2dev=--cpu-devices=2
    python scripts/compare_peer.py --what sample --rounds 2 --variant 2dev=--cpu-devices=2

``--what train``: training images/s per size (the peer: forward + backward + Adam, median of
its timed steps; here the real pmapped train step, median of ``--repeats`` calls).
``--what sample``: 100-step DDIM at batch 32, seconds per run (the peer: one call of its
``GaussianDiffusion.sample``; here the median of ``--repeats`` calls of the ``lax.scan`` DDIM
sampler with 100 steps). The table gives, per variant and size, the median over rounds of
each side and the median over rounds of the round-by-round ratio (this library / peer, as a
speed: > 1 is faster), with the load average (1 min) read at the start of every round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ("small", "base")
DDIM_STEPS, SAMPLE_BATCH = 100, 32


def parse_variant(text: str) -> tuple[str, list[str], dict]:
    """'name=tok tok ...' -> (name, benchmark args, environment); ``repo=PATH`` goes into the
    environment dict under the key ``repo``."""
    name, _, rest = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--variant must be NAME=ARGS, got {text!r}")
    args, env = [], {}
    for tok in rest.split():
        key, eq, value = tok.partition("=")
        if eq and (key.isupper() or key == "repo"):
            env[key] = value
        else:
            args.append(tok)
    return name, args, env


def run_peer(python: str, peer_dir: str, what: str, sizes: list[str], out: str) -> dict:
    """Peer figures per size: train images/s or the 100-step DDIM seconds."""
    cmd = [python, os.path.join(peer_dir, "bench_peer.py"), "--sizes", *sizes, "--repeats", "1", "--out", out]
    if what == "train":
        cmd.append("--no-ddim")
    else:  # the sampler's own figures only; the train steps still run (few, untimed here)
        cmd += ["--train-steps", "1", "--warmup", "1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=peer_dir)
    with open(out) as f:
        res = json.load(f)["results"]
    key = "train_img_per_s" if what == "train" else "ddim100_total_s"
    return {s: res[s]["summary"][key]["median"] for s in sizes}


def run_ours(args: list[str], env: dict, what: str, sizes: list[str], repeats: int, out: str) -> dict:
    """This library's figures per size, from one fresh ``scripts/benchmark.py`` process."""
    env = dict(env)
    root = env.pop("repo", ROOT)
    cmd = [sys.executable, os.path.join(root, "scripts", "benchmark.py"), "--sizes", ",".join(sizes),
           "--repeats", str(repeats), "--json", out]
    if what == "train":
        cmd += ["--only", "train"]
    else:
        cmd += ["--only", "sample", "--samplers", "ddim", "--sample-steps", str(DDIM_STEPS // 2),
                "--sample-batch", str(SAMPLE_BATCH), "--compile-steps", str(DDIM_STEPS)]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"benchmark.py failed ({' '.join(cmd + args)}):\n{proc.stderr[-3000:]}")
    with open(out) as f:
        unet = json.load(f)["unet"]
    if what == "train":
        return {s: unet[s]["train"]["images_per_s"]["median"] for s in sizes}
    return {s: unet[s]["samplers"]["ddim"]["seconds_double"]["median"] for s in sizes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="train", choices=("train", "sample"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per figure in each benchmark.py run")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--variant", action="append", type=parse_variant, default=None,
                   help="NAME=ARGS: a benchmark.py run (repeatable; default: one plain run)")
    p.add_argument("--peer-python", default=os.path.join(os.environ.get("PEER_VENV", "/work/peer_venv"),
                                                         "bin", "python"))
    p.add_argument("--peer-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "peer"))
    p.add_argument("--json", default="compare_peer.json")
    a = p.parse_args(argv)
    sizes = [s for s in a.sizes.split(",") if s]
    if not sizes or set(sizes) - set(SIZES):
        p.error(f"--sizes: a subset of {SIZES}, got {a.sizes!r}")
    if a.rounds < 1 or a.repeats < 1:
        p.error("--rounds and --repeats must be >= 1")
    if not os.path.exists(os.path.join(a.peer_dir, "bench_peer.py")) or not os.path.exists(a.peer_python):
        p.error(f"the peer's harness ({a.peer_dir}/bench_peer.py) or its python ({a.peer_python}) is missing: "
                f"see {a.peer_dir}/README.md")
    variants = a.variant or [("plain", [], {})]
    sides = ["peer"] + [v[0] for v in variants]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            record = {"load_avg_1min": os.getloadavg()[0], "order": order}
            for side in order:
                start = time.time()
                out = os.path.join(tmp, f"{side}.json")
                if side == "peer":
                    record[side] = run_peer(a.peer_python, a.peer_dir, a.what, sizes, out)
                else:
                    _, args, env = next(v for v in variants if v[0] == side)
                    record[side] = run_ours(args, env, a.what, sizes, a.repeats, out)
                print(f"round {r + 1}/{a.rounds} load {record['load_avg_1min']:.1f} {side}: "
                      + ", ".join(f"{s} {v:.3g}" for s, v in record[side].items())
                      + f" ({time.time() - start:.0f} s)", flush=True)
            rounds.append(record)
    speed = (lambda v: v) if a.what == "train" else (lambda v: 1.0 / v)  # images/s or runs/s
    unit = "images/s" if a.what == "train" else f"s per {DDIM_STEPS}-step DDIM, batch {SAMPLE_BATCH}"
    table = []
    for name, args, env in variants:
        for s in sizes:
            ratios = [speed(rd[name][s]) / speed(rd["peer"][s]) for rd in rounds]
            table.append({"variant": name, "size": s, "ours": statistics.median(rd[name][s] for rd in rounds),
                          "peer": statistics.median(rd["peer"][s] for rd in rounds),
                          "ratio_median": statistics.median(ratios), "ratios": ratios,
                          "args": args, "env": env})
    loads = [rd["load_avg_1min"] for rd in rounds]
    print(f"\n{a.what}: {unit}, medians over {a.rounds} rounds; ratio = this library's speed / the peer's, "
          f"round by round (median [all]); load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'variant':<12} {'size':<6} {'ours':>8} {'peer':>8}  ratio")
    for t in table:
        print(f"{t['variant']:<12} {t['size']:<6} {t['ours']:>8.3g} {t['peer']:>8.3g}  {t['ratio_median']:.2f} "
              f"[{', '.join(f'{x:.2f}' for x in t['ratios'])}]")
    doc = {"what": a.what, "unit": unit, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "rounds": rounds, "table": table}
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
