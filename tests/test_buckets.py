"""Token bucketing (config.text.buckets): the bucket a batch gets, the processes' agreement on it (two real processes,
the coordination service's key-value store), the same loss and gradients as at text.max_length, and the config's
checks."""

import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from imagen_jax import config as config_lib
from imagen_jax.errors import ConfigError
from imagen_jax.stage.config import base_config, complete
from imagen_jax.train import buckets
from tests.processes import REPO, free_port
from tests.test_train import assets, tiny_config  # noqa: F401  (the module's shards and tiny T5)

CAPTIONS = ["a red circle", "a blue square at the top", "a green triangle", "a red circle on the left"] * 2


def _config(buckets_: tuple, max_length: int = 128) -> ml_collections.ConfigDict:
    c = base_config()
    c.text.max_length, c.text.buckets = max_length, buckets_
    return c


def test_a_batch_gets_the_smallest_bucket_that_holds_its_longest_caption(assets):
    allowed = buckets.lengths(_config((16, 32, 64)))
    assert allowed == (16, 32, 64, 128)  # max_length is the last bucket
    chosen = [buckets.bucket(n, allowed) for n in (1, 16, 17, 32, 33, 64, 65, 128)]
    assert chosen == [16, 16, 32, 32, 64, 64, 128, 128]
    assert buckets.lengths(_config(())) == (128,) and buckets.bucket(3, (128,)) == 128  # off: max_length
    assert buckets.lengths(_config((8, 16), max_length=16)) == (8, 16)  # a bucket at max_length is that one

    # Cut to its bucket, a batch tokenised at max_length is what tokenising at the bucket gives (EOS kept), and a
    # caption longer than max_length stays truncated as without buckets.
    from imagen_jax.text import Tokenizer

    tokenizer = Tokenizer(str(assets / "t5"))
    ids, mask = tokenizer(CAPTIONS, 16)
    longest = buckets.longest(mask)
    assert longest == 7 and buckets.bucket(longest, (4, 8, 16)) == 8
    short_ids, short_mask = tokenizer(CAPTIONS, 8)
    cut_ids, cut_mask = buckets.cut(ids, mask, 8)
    np.testing.assert_array_equal(cut_ids, short_ids)
    np.testing.assert_array_equal(cut_mask, short_mask)
    long_ids, long_mask = tokenizer([" and ".join(CAPTIONS)], 16)
    assert buckets.longest(long_mask) == 16 and buckets.bucket(16, (4, 8, 16)) == 16 and long_ids[0, -1] == 1  # EOS


AGREE = textwrap.dedent("""
    import sys, threading
    import jax
    process_id, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    from jax._src.distributed import global_state
    from imagen_jax.parallel import agree
    from imagen_jax.train import buckets

    # Process 0's local captions are short, process 1's first batch has a long one (tokens, EOS included).
    local = {0: [5, 9, 3], 1: [40, 7, 3]}[process_id]
    lengths = agree.MaxAgreement("text_length")
    chosen = [buckets.bucket(lengths.agree(i, n), (16, 32, 64, 128)) for i, n in enumerate(local)]
    print("chosen", chosen)
    # Both processes have finished batch 1 (each published batch 2): their batch-0 keys are deleted.
    prefix = lengths._prefix
    print("left", len(global_state.client.key_value_dir_get(f"{prefix}/0/")),
          len(global_state.client.key_value_dir_get(f"{prefix}/2/")))
    if process_id == 0:  # process 1 never gives batch 3: close() ends the wait (the loop stopping)
        threading.Timer(1.0, lengths.close).start()
        try:
            lengths.agree(3, 1)
        except agree.Closed:
            print("closed")
    jax.distributed.shutdown()
""")


def test_two_processes_agree_on_the_longest_caption_of_the_global_batch():
    """Process 0's own captions fit 16 tokens; process 1 has a 40-token one in the first batch: both cut that batch
    to 64. Keys of finished batches are deleted; a wait the loop's end closes returns."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")
    args = dict(cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(i), str(port)], **args) for i in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outputs:
        lines = out.splitlines()
        assert "chosen [64, 16, 16]" in lines, out  # each process alone would pick [16, 16, 16] and [64, 16, 16]
        assert "left 0 2" in lines, out
    assert "closed" in outputs[0][0].splitlines()


@pytest.mark.slow  # two compiles of the tiny train step: 35-65 s on 2 loaded cores
def test_a_bucketed_batch_trains_like_one_at_max_length(assets):
    """T5 in the step: the batch cut to 8 tokens gives the loss and gradients (Adam's first moments after one step,
    0.1 x the gradient) of the same batch at max_length 16 (float32), as every padded position is masked. The
    parameters are random (the init's zeroed output projections would hide the text): hiding the longest captions'
    EOS changes the gradients."""
    from imagen_jax.parallel import mesh as mesh_lib
    from imagen_jax.train import setup as setup_lib
    from tests.random_params import random_state

    c = config_lib.load_config_file(os.path.join(REPO, "configs/demo.py"))
    c.text.encoder, c.text.max_length, c.text.buckets = str(assets / "t5"), 16, (4, 8)
    c.data.image_size, c.model.dim, c.model.channel_mults = 8, 16, (1,)
    c.model.attn_resolutions, c.model.head_dim = (8,), 8
    c.train.batch_size, c.train.warmup_steps = 8, 0
    mesh = mesh_lib.make_mesh(c.mesh)
    trainer = setup_lib.setup(c, mesh, setup_lib.load_text(c, mesh))
    encoder = trainer.text.encoder
    params = random_state(trainer.abstract_state()["params"])
    ids, mask = encoder.tokenizer(CAPTIONS, c.text.max_length)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)

    def step(ids: np.ndarray, mask: np.ndarray) -> tuple[float, list[np.ndarray]]:
        batch = mesh_lib.global_batch({"image": images, "ids": ids, "mask": mask}, mesh)
        state, metrics = trainer.train_step(trainer.init_state(params), encoder.state, batch, trainer.no_streak())
        moments = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["opt_state"])) if np.ndim(x)]
        return float(metrics["loss"]), moments

    def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        """The largest difference of two steps' moments, as a fraction of the largest moment."""
        return max(np.abs(x - y).max() for x, y in zip(a, b)) / max(np.abs(x).max() for x in a)

    length = buckets.bucket(buckets.longest(mask), buckets.lengths(c))
    assert length == 8
    full_loss, full = step(ids, mask)
    cut_loss, cut = step(*buckets.cut(ids, mask, length))
    assert cut_loss == pytest.approx(full_loss, rel=1e-5)
    assert largest_difference(cut, full) < 1e-6
    hidden = mask[:, :length].copy()
    hidden[hidden.sum(axis=1) == length - 1, length - 2] = False  # the 7-token captions' EOS
    assert largest_difference(step(ids[:, :length], hidden)[1], full) > 1e-4  # 2.7e-4 here


@pytest.mark.parametrize(
    "value, message",
    [
        ((32, 16), r"config.text.buckets=\(32, 16\) must be increasing"),
        ((16, 16), r"config.text.buckets=\(16, 16\) must be increasing"),
        ((0, 16), r"config.text.buckets=\(0, 16\) must lie in \[1, text.max_length=128\]"),
        ((16, 256), r"config.text.buckets=\(16, 256\) must lie in \[1, text.max_length=128\]"),
        ("16,32", r"config.text.buckets='16,32' must be a tuple of token counts"),
        ((16.0,), r"config.text.buckets=\(16.0,\) must be a tuple of token counts"),
    ],
)
def test_bad_buckets_are_one_line_config_errors(value, message):
    from imagen_jax.train import setup as setup_lib

    c = base_config().to_dict()
    c["text"]["buckets"] = value  # as a config file or an old config.json could give it
    with pytest.raises(ConfigError, match=f"^{message}"):
        setup_lib.validate(ml_collections.ConfigDict(c))


def test_buckets_default_off_for_old_configs_and_are_refused_for_if():
    from imagen_jax.train import setup as setup_lib

    old = base_config().to_dict()
    del old["text"]["buckets"]
    assert complete(ml_collections.ConfigDict(old)).text.buckets == ()  # a config saved before the field: off
    with pytest.raises(ConfigError, match="config.text.encoder is empty"):  # good buckets pass: the next check fails
        setup_lib.validate(_config((16, 32, 64)))
    c = base_config("if_unet")
    c.text.buckets = (16,)
    with pytest.raises(ConfigError, match=r"^config.text.buckets=\(16,\) cannot be used with DeepFloyd IF's U-Net"):
        setup_lib.validate(c)


@pytest.mark.slow  # 3 training steps of the tiny model: ~90 s on 2 loaded cores
def test_the_loop_cuts_dreambooth_batches_to_their_bucket_and_says_it_compiles_for_it(assets, tmp_path, monkeypatch):
    """Every batch the train step gets (DreamBooth's: instance and class captions together, with their weights) is cut
    to the bucket of its longest caption (the demo's: 7 tokens -> 8 of max_length 16), and the log names the length
    the step was compiled for."""
    import dataclasses

    from imagen_jax.train import loop

    shapes, setup = [], loop.setup_lib.setup

    def spy_setup(*args, **kwargs):
        trainer = setup(*args, **kwargs)

        def train_step(state, t5_params, batch, streak):
            shapes.append((batch["ids"].shape, batch["mask"].shape, batch["weight"].shape))
            return trainer.train_step(state, t5_params, batch, streak)

        return dataclasses.replace(trainer, train_step=train_step)

    monkeypatch.setattr(loop.setup_lib, "setup", spy_setup)
    config = tiny_config(assets, num_steps=3, log_every=1, checkpoint_every=100, sample_every=0)
    config.text.buckets = (4, 8)
    config.data.prior_shards = config.data.train_shards
    lines = []
    monkeypatch.setattr(loop.Progress, "echo", lambda self, line: lines.append(line))
    loop.run(config, str(tmp_path / "run"))
    assert shapes == [((8, 8), (8, 8), (8,))] * 3
    assert "compiling the train step for 8-token captions (the first step waits for it)" in lines
