"""imagen-jax against imagen-pytorch on this machine's CPU: the same U-Nets (layouts.py), train steps and sampling.

    bash benchmarks/setup_peer.sh                     # once: imagen-pytorch + CPU torch in benchmarks/.venv-peer
    python benchmarks/side_by_side.py [--models tiny32,base64-small] [--what train,sample] [--rounds 3]
                                      [--train_steps 3] [--json results.json]

Run from the project's venv. Our side runs in this process (the real jitted train step from `train.setup` and the
stage's sampler); the peer's runs in a worker process in the peer venv (peer_worker.py), so torch never enters the
project's venv. For each model both sides are built once and their parameters and FLOPs compared (2 x multiply-adds
of convolutions and matrix products in one forward + backward, counted by the same rule on both sides: torch's
FlopCounterMode there, matmul_flops.py on our jaxpr here); a difference over 5% stops the run, because the timings
would not compare like with like. Then rounds alternate peer, ours, peer, ours... so slow drift in the machine's
load hits both sides alike; each round times `--train_steps` train steps (batch and image size from layouts.py)
and one sampling run (4 images, 50 DDPM steps, classifier-free guidance 3). Compiling (ours) and first-call
allocation (the peer's) happen in an untimed warm-up. The table gives medians with their min-max spread and the
ratio peer / ours of the medians (> 1: imagen-jax is faster). Both sides compute in float32 on 2 CPU threads.

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

from layouts import LAYOUTS, TOLERANCE  # noqa: E402

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


def run_model(name: str, whats: list[str], rounds: int, train_steps: int, peer_python: Path) -> dict:
    """Counts, then `rounds` alternating timed rounds of each of `whats`, for layout `name`."""
    import ours as ours_lib  # JAX: imported once the arguments are known to be good

    layout = LAYOUTS[name]
    sample_args = {"images": layout["sample_images"], "steps": layout["sample_steps"], "guidance": layout["guidance"]}
    log(f"[{name}] building imagen-pytorch's U-Net (counting FLOPs, one warm-up step)")
    peer = PeerWorker(peer_python)
    try:
        spec = {key: layout[key] for key in ("image_size", "batch", "text_len", "text_dim", "sample_steps")}
        peer_counts = peer.ask({"op": "build", "unet": layout["peer"], "threads": 2, "seed": 0, **spec})
        log(f"[{name}] building ours (counting FLOPs, compiling, one warm-up step)")
        ours_counts = ours_lib.count(layout)
        problems = mismatches(peer_counts, ours_counts)
        if problems:
            raise HarnessError(f"{name}: the two U-Nets differ by more than {TOLERANCE:.0%}: " + "; ".join(problems))
        ours = ours_lib.Ours(layout)
        if "sample" in whats:
            log(f"[{name}] sampling warm-up (compiling ours)")
            peer.ask({"op": "sample", **sample_args})
            ours.sample(**sample_args)
        times = {what: {"peer": [], "ours": []} for what in whats}
        for r in range(rounds):
            for what in whats:
                if what == "train":
                    got = {"peer": peer.ask({"op": "train", "steps": train_steps})["seconds"]}
                    got["ours"] = ours.train(train_steps)
                else:
                    got = {"peer": [peer.ask({"op": "sample", **sample_args})["seconds"]]}
                    got["ours"] = [ours.sample(**sample_args)]
                for side, values in got.items():
                    times[what][side] += values
                p, o = (statistics.median(got[side]) for side in ("peer", "ours"))
                log(f"[{name}] round {r + 1}/{rounds} {what}: peer {p:.3f} s, ours {o:.3f} s")
    finally:
        peer.close()
    return {
        "layout": {key: layout[key] for key in ("image_size", "batch")},
        "counts": {"peer": peer_counts, "ours": ours_counts},
        "timings": {what: {side: spread(values) for side, values in sides.items()} for what, sides in times.items()},
    }


def report(results: dict) -> str:
    """The counts table and the timings table (medians, min-max, ratio peer / ours), under the allocator both
    sides ran with: it moves both (benchmarks/README.md), so a table without it cannot be compared."""
    lines = [
        f"Allocator (both sides): {os.environ.get('LD_PRELOAD') or 'the C library malloc'}",
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
        "| model | what | imagen-pytorch: median (min-max) | imagen-jax: median (min-max) | peer / ours |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        batch = result["layout"]["batch"]
        for what, sides in result["timings"].items():
            unit = f"s/step (batch {batch})" if what == "train" else "s (4 images x 50 steps)"
            cells = [f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) {unit}, n={s['n']}" for s in sides.values()]
            ratio = sides["peer"]["median"] / sides["ours"]["median"]
            lines.append(f"| {name} | {what} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")
    return "\n".join(lines)


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
    parser.add_argument("--peer_python", type=Path, default=PEER_PYTHON, help="the peer venv's python")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)
    try:
        models = parse_list(args.models, LAYOUTS, "--models")
        whats = parse_list(args.what, WHATS, "--what")
        if args.rounds < 1 or args.train_steps < 1:
            raise HarnessError("--rounds and --train_steps must be >= 1")
        if not args.peer_python.exists():
            PeerWorker(args.peer_python)  # raises the one-line hint
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        start = time.perf_counter()
        results = {}
        for name in models:
            results[name] = run_model(name, whats, args.rounds, args.train_steps, args.peer_python)
            log(report({name: results[name]}))  # a model's figures survive an interrupted run
    except HarnessError as e:
        print(f"side_by_side: error: {e}", file=sys.stderr)
        return 1
    log(f"done in {time.perf_counter() - start:.0f} s")
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
