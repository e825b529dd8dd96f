"""Convert the FID Inception weights (PyTorch .pth) to the safetensors file `load_inception` reads, once, without
torch.

    python -m imagen_jax.tools.convert_inception --weights pt_inception-2015-12-05-6726825d.pth \
        --out inception-2015-12-05.safetensors [--allow_unknown_hash] [--overwrite]

--weights is pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's
weights-inception-2015-12-05-6726825d.pth (the same file). It is read as data (no pickle is run; zip and legacy
PyTorch files both), and checked as torch hub checks downloads: its sha256 must start with the digits in the
standard name, 6726825d; other weights are refused unless --allow_unknown_hash. The convolution and batch norm
tensors are written unchanged (float32) with the source's sha256 and a weights_id in the metadata; the unused
classifier (fc) is dropped. The file is written under a temporary name and renamed when complete. Exit status 2
for a bad argument, 1 when the weights cannot be used; the error is one line.
"""

from __future__ import annotations

import argparse
import os
import sys


def check_hash(weights: str, allow_unknown_hash: bool) -> tuple[str, str]:
    """The file's sha256 and its weights_id: the standard id when the hash matches, else (if allowed) one naming
    the hash."""
    from imagen_jax.errors import WeightsError
    from imagen_jax.eval.inception_weights import STANDARD_SHA256_PREFIX, STANDARD_WEIGHTS_ID, file_sha256

    digest = file_sha256(weights)
    if digest.startswith(STANDARD_SHA256_PREFIX):
        return digest, STANDARD_WEIGHTS_ID
    if not allow_unknown_hash:
        raise WeightsError(
            f"{weights}: sha256 {digest} does not start with {STANDARD_SHA256_PREFIX}, the hash of the standard FID "
            "weights pt_inception-2015-12-05-6726825d.pth; pass --allow_unknown_hash to convert other weights"
        )
    return digest, f"sha256-{digest[:16]}"


def convert(weights: str, out: str, *, allow_unknown_hash: bool = False, overwrite: bool = False) -> str:
    """Writes the Inception tensors of the .pth `weights` to `out`; returns the weights_id recorded."""
    from imagen_jax.errors import MissingError, OutputError, WeightsError
    from imagen_jax.eval.inception_weights import tensor_shapes, write_weights
    from imagen_jax.text.torch_checkpoint import TorchCheckpoint

    if not os.path.isfile(weights):
        raise MissingError(f"--weights {weights} not found")
    if os.path.exists(out) and not overwrite:
        raise OutputError(f"--out {out} exists; pass --overwrite to replace it")
    digest, weights_id = check_hash(weights, allow_unknown_hash)
    checkpoint = TorchCheckpoint(weights)
    try:
        tensors = {}
        for name, shape in tensor_shapes().items():
            if name not in checkpoint.tensors:
                raise WeightsError(f"{weights}: missing Inception tensor '{name}'")
            if checkpoint.tensors[name].shape != shape:
                raise WeightsError(
                    f"{weights}: Inception tensor '{name}' has shape {checkpoint.tensors[name].shape}, expected {shape}"
                )
            tensors[name] = checkpoint.get(name)
    finally:
        checkpoint.close()
    write_weights(out, tensors, weights_id=weights_id, source_sha256=digest)
    print(f"convert_inception: wrote {len(tensors)} tensors to {out} (weights_id {weights_id})", flush=True)
    return weights_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_inception", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument(
        "--allow_unknown_hash", action="store_true", help="convert weights whose sha256 is not the standard file's"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    from imagen_jax.cli import main_guard

    def body() -> int:
        convert(args.weights, args.out, allow_unknown_hash=args.allow_unknown_hash, overwrite=args.overwrite)
        return 0

    return main_guard("convert_inception", body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
