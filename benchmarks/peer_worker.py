"""The imagen-pytorch side of side_by_side.py; runs inside the peer venv (setup_peer.sh), never in the project's.

    .venv-peer/bin/python peer_worker.py --check    # imports imagen-pytorch offline, prints its version
    .venv-peer/bin/python peer_worker.py --serve    # JSON requests on stdin, one JSON answer per line on stdout

Requests (one per line; the model is built once by `build` and reused, as the driver's own side is):
  {"op": "build", "unet": {Unet kwargs}, "image_size": 32, "batch": 32, "text_len": 64, "text_dim": 512,
   "threads": 2, "seed": 0}              -> {"params": N, "flops": F}
  {"op": "train", "steps": k}            -> {"seconds": [per-step wall times]}
  {"op": "sample", "images": 4, "steps": 50, "guidance": 3.0}  -> {"seconds": s}
Errors answer {"error": "..."}. FLOPs are 2 x multiply-adds of convolutions and matrix products (attention's
included) in one forward + backward of the training loss, counted by torch's FlopCounterMode: the rule the
driver applies to the JAX side's jaxpr.

imagen-pytorch asks the model hub for google/t5-v1_1-base's config when it is imported (its default text width);
no hub is reachable, so that config is written into a private HF_HOME first and text_embed_dim is always given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T5_NAME = "google/t5-v1_1-base"
HF_HOME = Path(__file__).resolve().parent / "hf_home"


def _offline_hub() -> None:
    """A hub cache holding only T5-v1.1-base's config.json, and the hub switched off."""
    repo = HF_HOME / "hub" / ("models--" + T5_NAME.replace("/", "--"))
    snapshot = repo / "snapshots" / "offline"
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("offline")
    config = {"model_type": "t5", "d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12, "num_layers": 12,
              "feed_forward_proj": "gated-gelu", "vocab_size": 32128}  # fmt: skip
    (snapshot / "config.json").write_text(json.dumps(config))
    os.environ["HF_HOME"] = str(HF_HOME)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _import_imagen():
    """imagen_pytorch, imported offline. torchvision's PyPI wheel cannot load its C++ ops against CPU torch, and its
    Python side registers fake kernels for nms/qnms at import: declaring the two schemas first lets it import."""
    _offline_hub()
    import torch

    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already declared: a torchvision build whose ops load
            pass
    import imagen_pytorch

    return imagen_pytorch


class Peer:
    """One imagen-pytorch Imagen (a single U-Net), its optimizer and a fixed random batch."""

    def __init__(self, spec: dict):
        import torch

        imagen_pytorch = _import_imagen()
        torch.set_num_threads(int(spec["threads"]))
        torch.manual_seed(int(spec["seed"]))
        self.torch = torch
        text_dim = int(spec["text_dim"])
        self.unet = imagen_pytorch.Unet(**spec["unet"], text_embed_dim=text_dim)
        self.imagen = imagen_pytorch.Imagen(
            unets=(self.unet,),
            image_sizes=(int(spec["image_size"]),),
            text_embed_dim=text_dim,
            timesteps=int(spec.get("sample_steps", 50)),
            cond_drop_prob=0.1,
        )
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4)
        b, size, length = int(spec["batch"]), int(spec["image_size"]), int(spec["text_len"])
        self.images = torch.rand(b, 3, size, size)
        self.text = torch.randn(b, length, text_dim)
        self.mask = torch.ones(b, length, dtype=torch.bool)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def step(self) -> None:
        """Loss, backward, clipping, Adam, EMA: what one training step of either project does."""
        torch = self.torch
        loss = self.imagen(self.images, text_embeds=self.text, text_masks=self.mask, unet_number=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1e-4)

    def flops(self) -> int:
        """Of the whole batch, counted on its first example times the batch size: every counted op works on each
        example separately, so this is exact, and minutes faster at base64-small's size on a CPU."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            loss = self.imagen(self.images[:1], text_embeds=self.text[:1], text_masks=self.mask[:1], unet_number=1)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops()) * len(self.images)

    def train(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return times

    def sample(self, images: int, steps: int, guidance: float) -> float:
        if steps != self.imagen.noise_schedulers[0].num_timesteps:
            raise ValueError(f"this Imagen samples with {self.imagen.noise_schedulers[0].num_timesteps} steps")
        text, mask = self.text[:images], self.mask[:images]
        start = time.perf_counter()
        with self.torch.no_grad():
            out = self.imagen.sample(text_embeds=text, text_masks=mask, cond_scale=guidance, use_tqdm=False)
        elapsed = time.perf_counter() - start
        if tuple(out.shape[:2]) != (images, 3):
            raise RuntimeError(f"sampled shape {tuple(out.shape)}")
        return elapsed


def serve() -> None:
    answers, sys.stdout = sys.stdout, sys.stderr  # imagen-pytorch prints advice; only answers go to the driver
    peer = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            op = request["op"]
            if op == "build":
                peer = Peer(request)
                peer.train(1)  # warm-up: first-call allocations, as the JAX side's compile step
                answer = {"params": peer.num_params(), "flops": peer.flops()}
            elif peer is None:
                raise RuntimeError(f"{op!r} before 'build'")
            elif op == "train":
                answer = {"seconds": peer.train(int(request["steps"]))}
            elif op == "sample":
                answer = {"seconds": peer.sample(int(request["images"]), int(request["steps"]), request["guidance"])}
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # noqa: BLE001 - every failure goes back to the driver as one line
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), file=answers, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="import imagen-pytorch offline and print its version")
    mode.add_argument("--serve", action="store_true", help="answer JSON requests from stdin")
    args = parser.parse_args()
    if args.check:
        print(f"imagen-pytorch {_import_imagen().__version__}")
    else:
        serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
