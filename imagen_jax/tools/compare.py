"""Side by side: two models (or two checkpoints of one) sampled on the same prompts and seeds, on one static
HTML page a person can rate.

    python -m imagen_jax.tools.compare --a runs/x/train --b runs/y/train --prompts_file drawbench.txt \
        --num_images 2 --out compare/
    python -m imagen_jax.tools.compare --a runs/x/train,runs/x/train_sr --a_checkpoint 20000,latest \
        --b runs/x/train,runs/x/train_sr --prompt "a corgi" --steps 64,32 --guidance_scale 5,1 --out compare/

--a and --b each name a cascade: the base stage's workdir, export folder or DeepFloyd IF folder, then its SR
stages, comma separated (both the same length); --text_encoder and --dtype load both as sample.py loads one.
--a_checkpoint / --b_checkpoint choose a checkpoint step per stage ('latest' by default). Both sides use the same
sampler settings (`sample.py`'s flags) and image i of both runs uses seed S + i, so a difference between the pair
is the models'. Writes OUT/a/ and OUT/b/ (sample folders, as sample.py writes them) and OUT/index.html: every pair
in a random left/right order (seeded by --seed, so the rater does not know which model is which), three buttons per
pair (left / same / right), a running tally, and a button that downloads the ratings as JSON, mapped back to a and
b. Ratings survive a reload (browser storage).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys

from imagen_jax.sample_args import add_model_flags, add_prompt_flags, add_stage_flags, read_prompts, stage_values

PAGE = "index.html"


def parse_checkpoints(value: str | None, count: int, flag: str) -> list[int | None]:
    """'latest,2000' -> [None, 2000]: one checkpoint step per stage ('latest' = None); ValueError names the flag."""
    if value is None:
        return [None] * count
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != count:
        raise ValueError(f"--{flag} has {len(parts)} values for {count} stages (one per stage; 'latest' for newest)")
    steps: list[int | None] = []
    for part in parts:
        if part == "latest":
            steps.append(None)
        elif part.isdigit():
            steps.append(int(part))
        else:
            raise ValueError(f"--{flag} {value!r}: each value must be a step (an int >= 0) or 'latest'")
    return steps


def page(title: str, sides: dict[str, dict], pairs: list[dict], seed: int) -> str:
    """The rating page: `pairs` ({prompt, seed, a, b} with image paths relative to the page), each shown in a
    seeded random order; `sides` describes a and b, revealed only on request."""
    import numpy as np

    flips = np.random.default_rng(seed).integers(0, 2, len(pairs)).astype(bool)
    rows = []
    for index, (pair, flip) in enumerate(zip(pairs, flips)):
        left, right = ("b", "a") if flip else ("a", "b")
        rows.append(
            f'<div class="pair" data-index="{index}" data-left="{left}" data-right="{right}">'
            f'<p class="prompt">{index + 1}. {html.escape(pair["prompt"])} <span class="seed">(seed {pair["seed"]})'
            f"</span></p>"
            f'<img src="{html.escape(pair[left])}" alt="left"><img src="{html.escape(pair[right])}" alt="right">'
            '<div class="buttons"><button data-choice="left">left is better</button>'
            '<button data-choice="same">about the same</button>'
            '<button data-choice="right">right is better</button></div></div>'
        )
    pair_data = json.dumps([{"prompt": p["prompt"], "seed": p["seed"]} for p in pairs])
    storage_key = json.dumps(f"imagen-jax-compare:{title}:{len(pairs)}:{seed}")
    reveal = html.escape(json.dumps(sides, indent=2))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em 2em; background: #fafafa; }}
.pair {{ display: inline-block; margin: 0 1.5em 1.5em 0; padding: .5em; background: white; border: 1px solid #ddd; }}
.pair img {{ width: 256px; height: 256px; image-rendering: pixelated; margin: 2px; border: 1px solid #ccc; }}
.prompt {{ max-width: 530px; margin: .2em 0; }} .seed {{ color: #888; font-size: 80%; }}
button.chosen {{ background: #2a7; color: white; }}
#tally {{ position: sticky; top: 0; background: #fafafa; padding: .5em 0; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each pair is the same prompt and seed from two models, in a random order. Pick the better image
(prompt following first, then quality). Ratings are kept in this browser; download them when done.</p>
<div id="tally"></div>
{"".join(rows)}
<p><button id="download">download ratings (JSON)</button></p>
<details><summary>which model is which</summary><pre>{reveal}</pre></details>
<script>
const PAIRS = {pair_data};
const KEY = {storage_key};
const ratings = JSON.parse(localStorage.getItem(KEY) || "{{}}");
function winner(el, choice) {{
  return choice === "same" ? "same" : el.dataset[choice];
}}
function refresh() {{
  const tally = {{a: 0, b: 0, same: 0}};
  document.querySelectorAll(".pair").forEach(el => {{
    const choice = ratings[el.dataset.index];
    el.querySelectorAll("button").forEach(b => b.classList.toggle("chosen", b.dataset.choice === choice));
    if (choice) tally[winner(el, choice)] += 1;
  }});
  const done = tally.a + tally.b + tally.same;
  const counts = ` (model a: ${{tally.a}}, model b: ${{tally.b}}, same: ${{tally.same}})`;
  document.getElementById("tally").textContent = `rated ${{done}} of ${{PAIRS.length}}` + (done ? counts : "");
}}
document.querySelectorAll(".pair button").forEach(b => b.addEventListener("click", () => {{
  ratings[b.closest(".pair").dataset.index] = b.dataset.choice;
  localStorage.setItem(KEY, JSON.stringify(ratings));
  refresh();
}}));
document.getElementById("download").addEventListener("click", () => {{
  const out = [];
  document.querySelectorAll(".pair").forEach(el => {{
    const choice = ratings[el.dataset.index];
    out.push({{...PAIRS[el.dataset.index], winner: choice ? winner(el, choice) : null}});
  }});
  const body = JSON.stringify({{title: {json.dumps(title)}, ratings: out}}, null, 2);
  const blob = new Blob([body], {{type: "application/json"}});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "ratings.json";
  link.click();
}});
refresh();
</script></body></html>
"""


def pairs_of(out: str) -> list[dict]:
    """The image pairs of OUT/a and OUT/b (their samples.json), matched by file name, with the prompt and seed."""
    index = {}
    for side in ("a", "b"):
        with open(os.path.join(out, side, "samples.json"), encoding="utf-8") as f:
            index[side] = json.load(f)["images"]
    return [
        {"prompt": entry["prompt"], "seed": entry["seed"], "a": f"a/{name}", "b": f"b/{name}"}
        for name, entry in index["a"].items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for side in ("a", "b"):
        parser.add_argument(f"--{side}", required=True, help="base workdir or export folder[,SR stage,...]")
        parser.add_argument(f"--{side}_checkpoint", help="checkpoint step per stage, or 'latest' (default)")
    add_prompt_flags(parser)
    add_stage_flags(parser)
    add_model_flags(parser)
    parser.add_argument("--title", default="imagen-jax: which image is better?", help="the page's title")
    parser.add_argument("--out", required=True, help="output folder (OUT/index.html, OUT/a/, OUT/b/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    cascades = {side: [w.strip() for w in getattr(args, side).split(",")] for side in ("a", "b")}
    if len(cascades["a"]) != len(cascades["b"]):
        parser.error(f"--a has {len(cascades['a'])} stages and --b {len(cascades['b'])}: compare like with like")
    count = len(cascades["a"])
    try:
        checkpoints = {s: parse_checkpoints(getattr(args, f"{s}_checkpoint"), count, f"{s}_checkpoint") for s in "ab"}
    except ValueError as e:
        parser.error(str(e))
    steps, scales, samplers = stage_values(args, count, parser)

    from imagen_jax.cli import main_guard
    from imagen_jax.files import write_atomically
    from imagen_jax.sample_files import check_arguments, check_writable, sample_to_folder

    def body() -> int:
        settings = dict(num_images=args.num_images, seed=args.seed, batch_size=args.batch_size)
        check_arguments(
            num_prompts=len(prompts),
            num_stages=count,
            sr_noise_level=args.sr_noise_level,
            steps=steps,
            guidance_scales=scales,
            samplers=samplers,
            **settings,
        )
        for side in "ab":
            check_writable(os.path.join(args.out, side), overwrite=args.overwrite)
        sides = {}
        for side in "ab":
            print(f"sampling model {side}: {', '.join(cascades[side])}", flush=True)
            sample_to_folder(
                cascades[side],
                prompts,
                out=os.path.join(args.out, side),
                steps=steps,
                guidance_scales=scales,
                samplers=samplers,
                sr_noise_level=args.sr_noise_level,
                overwrite=args.overwrite,
                checkpoint_steps=checkpoints[side],
                text_encoder=args.text_encoder,
                dtype=args.dtype,
                **settings,
            )
            with open(os.path.join(args.out, side, "samples.json"), encoding="utf-8") as f:
                first = next(iter(json.load(f)["images"].values()))
            sides[side] = first["stages"]
        pairs = pairs_of(args.out)
        path = os.path.join(args.out, PAGE)
        write_atomically(path, page(args.title, sides, pairs, args.seed).encode())
        print(json.dumps({"page": path, "pairs": len(pairs)}))
        return 0

    return main_guard("compare", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
