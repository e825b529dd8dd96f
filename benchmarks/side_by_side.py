"""imagen-jax against imagen-pytorch on this machine's CPU: the same U-Nets (layouts.py), train steps and sampling.

    bash benchmarks/setup_peer.sh                     # once: imagen-pytorch + CPU torch in benchmarks/.venv-peer
    python benchmarks/side_by_side.py [--models tiny32,base64-small] [--what train,sample] [--rounds 3]
                                      [--train_steps 3] [--layouts matched|defaults] [--threads 2]
                                      [--json results.json] [--log benchmarks/results.jsonl]

Run from the project's venv. Our side runs in this process (the real jitted train step from `train.setup` and the
stage's sampler); the peer's runs in a worker process in the peer venv (peer_worker.py), so torch never enters the
project's venv. For each model both sides are built once and their parameters and FLOPs compared (2 x multiply-adds
of convolutions and matrix products in one forward + backward, counted by the same rule on both sides: torch's
FlopCounterMode there, matmul_flops.py on our jaxpr here); a difference over 5% stops the run, because the timings
would not compare like with like. `--layouts defaults` instead builds each project as its users would, with its
own default options at the same widths, blocks and attention levels (layouts.defaults): the FLOPs then differ, and
the comparison that counts is per counted FLOP. Each round times `--train_steps` train steps (batch and image size
from layouts.py) and one sampling run (4 images, 50 DDPM steps, classifier-free guidance 3), both sides in turn,
the side that goes first alternating from round to round, so neither always runs on a cache or a clock the other
left. Compiling (ours) and first-call allocation (the peer's) happen in an untimed warm-up. The table gives
medians with their min-max spread, the ratio peer / ours of the medians (> 1: imagen-jax is faster) and that ratio
per counted FLOP (the wall-clock ratio times ours / the peer's train-step FLOPs; sampling is the same U-Net's
forward, so the same factor). Both sides compute in float32 on `--threads` CPUs: the process pins itself to that
many before JAX starts (XLA sizes its thread pool by the CPUs it may run on), the peer worker inherits the pin and
runs as many torch threads, whatever the machine has. `--log` appends the run (date, CPU, threads, allocator,
versions, every figure) as one JSON line: the benchmark README quotes every run, not the best.

The memory allocator moves both sides by ~1.3x (benchmarks/README.md): the peer inherits this process's
environment, so `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/side_by_side.py
...` runs both with tcmalloc; the report names the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's imagen_jax, whichever is installed in the venv

from layouts import LAYOUTS, TOLERANCE, defaults  # noqa: E402

PEER_PYTHON = HERE / ".venv-peer" / "bin" / "python"
WHATS = ("train", "sample")


class HarnessError(Exception):
    """A problem the user can fix; printed as one line."""


def spread(values: list[float]) -> dict:
    """Median, min and max of timings (seconds)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def mismatches(peer: dict, ours: dict, tolerance: float = TOLERANCE) -> list[str]:
    """The counts (params, flops) on which ours differs from the peer's by more than `tolerance`, described."""
    return [
        f"{key}: peer {peer[key]:.4g}, ours {ours[key]:.4g} ({ours[key] / peer[key] - 1:+.1%})"
        for key in ("params", "flops")
        if abs(ours[key] / peer[key] - 1) > tolerance
    ]


class PeerWorker:
    """peer_worker.py --serve in the peer venv, asked one JSON request at a time."""

    def __init__(self, python: Path):
        if not python.exists():
            raise HarnessError(f"peer venv missing ({python}): create it with `bash {HERE / 'setup_peer.sh'}`")
        self.process = subprocess.Popen(
            [str(python), str(HERE / "peer_worker.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise HarnessError(f"the peer worker exited (code {self.process.wait()}); its error is above")
        answer = json.loads(line)
        if "error" in answer:
            raise HarnessError(f"peer worker: {answer['error']}")
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pin_threads(threads: int) -> list[int]:
    """This process (and the peer worker it starts) on `threads` CPUs, before JAX starts its thread pool."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(cpus):
        raise HarnessError(f"--threads {threads}: this process may run on {len(cpus)} CPUs ({cpus})")
    os.sched_setaffinity(0, cpus[:threads])
    return cpus[:threads]


def run_model(
    name: str, whats: list[str], rounds: int, train_steps: int, peer_python: Path, threads: int, matched: bool
) -> dict:
    """Counts, then `rounds` timed rounds of each of `whats`, for layout `name` (matched, or both projects' defaults
    at its widths), the side that goes first alternating."""
    import ours as ours_lib  # JAX: imported once the arguments are known to be good

    layout = LAYOUTS[name] if matched else defaults(LAYOUTS[name])
    sample_args = {"images": layout["sample_images"], "steps": layout["sample_steps"], "guidance": layout["guidance"]}
    log(f"[{name}] building imagen-pytorch's U-Net (counting FLOPs, one warm-up step)")
    peer = PeerWorker(peer_python)
    try:
        spec = {key: layout[key] for key in ("image_size", "batch", "text_len", "text_dim", "sample_steps")}
        peer_counts = peer.ask({"op": "build", "unet": layout["peer"], "threads": threads, "seed": 0, **spec})
        log(f"[{name}] building ours (counting FLOPs, compiling, one warm-up step)")
        ours_counts = ours_lib.count(layout)
        problems = mismatches(peer_counts, ours_counts)
        if problems and matched:
            raise HarnessError(f"{name}: the two U-Nets differ by more than {TOLERANCE:.0%}: " + "; ".join(problems))
        ours = ours_lib.Ours(layout)
        if "sample" in whats:
            log(f"[{name}] sampling warm-up (compiling ours)")
            peer.ask({"op": "sample", **sample_args})
            ours.sample(**sample_args)
        times = {what: {"peer": [], "ours": []} for what in whats}
        timed = {
            ("train", "peer"): lambda: peer.ask({"op": "train", "steps": train_steps})["seconds"],
            ("train", "ours"): lambda: ours.train(train_steps),
            ("sample", "peer"): lambda: [peer.ask({"op": "sample", **sample_args})["seconds"]],
            ("sample", "ours"): lambda: [ours.sample(**sample_args)],
        }
        for r in range(rounds):
            order = ("peer", "ours") if r % 2 == 0 else ("ours", "peer")
            for what in whats:
                got = {side: timed[what, side]() for side in order}
                for side, values in got.items():
                    times[what][side] += values
                p, o = (statistics.median(got[side]) for side in ("peer", "ours"))
                log(f"[{name}] round {r + 1}/{rounds} {what} ({order[0]} first): peer {p:.3f} s, ours {o:.3f} s")
    finally:
        peer.close()
    return {
        "layout": {key: layout[key] for key in ("image_size", "batch")},
        "layouts": "matched" if matched else "defaults",
        "counts": {"peer": peer_counts, "ours": ours_counts},
        "timings": {what: {side: spread(values) for side, values in sides.items()} for what, sides in times.items()},
    }


def per_flop(result: dict, what: str) -> float:
    """peer / ours of the medians, per counted FLOP: how much faster ours computes each FLOP it does."""
    sides, counts = result["timings"][what], result["counts"]
    return sides["peer"]["median"] / sides["ours"]["median"] * counts["ours"]["flops"] / counts["peer"]["flops"]


def report(results: dict, threads: int) -> str:
    """The counts table and the timings table (medians, min-max, ratio peer / ours, also per counted FLOP), under
    the allocator both sides ran with: it moves both (benchmarks/README.md), so a table without it cannot be
    compared."""
    lines = [
        f"Allocator (both sides): {os.environ.get('LD_PRELOAD') or 'the C library malloc'}; {threads} CPU threads each",
        "",
        "| model | params peer | params ours | GFLOP/step peer | GFLOP/step ours |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        p, o = result["counts"]["peer"], result["counts"]["ours"]
        lines.append(
            f"| {name} | {p['params'] / 1e6:.2f}M | {o['params'] / 1e6:.2f}M ({o['params'] / p['params'] - 1:+.1%}) "
            f"| {p['flops'] / 1e9:.1f} | {o['flops'] / 1e9:.1f} ({o['flops'] / p['flops'] - 1:+.1%}) |"
        )
    lines += [
        "",
        "| model | layouts | what | imagen-pytorch: median (min-max) | imagen-jax: median (min-max) | peer / ours "
        "| per FLOP |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        batch = result["layout"]["batch"]
        for what, sides in result["timings"].items():
            unit = f"s/step (batch {batch})" if what == "train" else "s (4 images x 50 steps)"
            cells = [f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) {unit}, n={s['n']}" for s in sides.values()]
            ratio = sides["peer"]["median"] / sides["ours"]["median"]
            lines.append(
                f"| {name} | {result['layouts']} | {what} | {cells[0]} | {cells[1]} | {ratio:.2f}x "
                f"| {per_flop(result, what):.2f}x |"
            )
    return "\n".join(lines)


def log_run(path: Path, results: dict, threads: int, cpus: list[int]) -> None:
    """Appends this run to the JSON-lines log the benchmark README quotes every run from."""
    import platform

    import jax

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "machine_cpus": os.cpu_count(),
        "threads": threads,
        "pinned_cpus": cpus,
        "allocator": os.environ.get("LD_PRELOAD") or "malloc",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "command": " ".join(sys.argv),
        "results": results,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def parse_list(text: str, allowed, flag: str) -> list[str]:
    items = [item for item in text.split(",") if item]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise HarnessError(f"{flag}: {', '.join(unknown) or 'nothing given'}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(LAYOUTS), help="comma-separated layouts.py names")
    parser.add_argument("--what", default=",".join(WHATS), help="train, sample or both")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per model")
    parser.add_argument("--train_steps", type=int, default=3, help="train steps timed per round and side")
    parser.add_argument(
        "--layouts", default="matched", choices=("matched", "defaults"), help="matched U-Nets, or each side's defaults"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPUs (and threads) for each side")
    parser.add_argument("--peer_python", type=Path, default=PEER_PYTHON, help="the peer venv's python")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    parser.add_argument("--log", type=Path, default=None, help="append the run to this JSON-lines file")
    args = parser.parse_args(argv)
    try:
        models = parse_list(args.models, LAYOUTS, "--models")
        whats = parse_list(args.what, WHATS, "--what")
        if args.rounds < 1 or args.train_steps < 1:
            raise HarnessError("--rounds and --train_steps must be >= 1")
        if not args.peer_python.exists():
            PeerWorker(args.peer_python)  # raises the one-line hint
        cpus = pin_threads(args.threads)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        start = time.perf_counter()
        results = {}
        matched = args.layouts == "matched"
        for name in models:
            results[name] = run_model(
                name, whats, args.rounds, args.train_steps, args.peer_python, args.threads, matched
            )
            log(report({name: results[name]}, args.threads))  # a model's figures survive an interrupted run
    except HarnessError as e:
        print(f"side_by_side: error: {e}", file=sys.stderr)
        return 1
    log(f"done in {time.perf_counter() - start:.0f} s")
    print(report(results, args.threads))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.log:
        log_run(args.log, results, args.threads, cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
