"""Our train step with each attention form, alternating in one process (no peer beside it): what
`train.attention=auto` gains where it resolves to `chunked`.

    python benchmarks/our_attention.py [--model base64-small] [--layouts defaults|matched] [--rounds 3]

Builds the layout's stage (`layouts.py`) once per form (`dot_product`, `auto`), then times one train step of each
per round, the first form alternating, and prints the medians (min-max) and their ratio.
"""

from __future__ import annotations

import argparse
import statistics

import jax
from layouts import LAYOUTS, defaults

FORMS = ("dot_product", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base64-small", choices=sorted(LAYOUTS))
    parser.add_argument("--layouts", default="defaults", choices=("defaults", "matched"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    import ours  # JAX-side imports once the platform is set

    layout = defaults(LAYOUTS[args.model]) if args.layouts == "defaults" else LAYOUTS[args.model]
    steps = {}
    for form in FORMS:
        steps[form] = ours.Ours({**layout, "ours_train": {**layout.get("ours_train", {}), "attention": form}})
        print(f"built {form}", flush=True)
    times = {form: [] for form in FORMS}
    for r in range(args.rounds):
        for form in FORMS if r % 2 == 0 else FORMS[::-1]:
            times[form] += steps[form].train(1)
            print(f"round {r + 1}: {form} {times[form][-1]:.2f} s", flush=True)
    for form, values in times.items():
        print(f"{form}: {statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})")
    print(f"auto is {statistics.median(times['dot_product']) / statistics.median(times['auto']):.2f}x dot_product")


if __name__ == "__main__":
    main()
