"""TPU slices the pod configs are laid out for, and the argument parsing they share.

A slice is named by its Cloud TPU accelerator type (``tpu_scripts/create.sh --accelerator-type``);
``topology`` is what ``python -m moejax.preflight --topology`` takes for it. v5p accelerator types
count TensorCores (two per chip), v5e and v6e count chips.
"""

from experiments import common as experiments_common

SLICES = {
    "v5p-64": dict(topology="v5p:2x4x4", chips=32, runtime="v2-alpha-tpuv5"),
    "v6e-256": dict(topology="v6e:16x16", chips=256, runtime="v2-alpha-tpuv6e"),
    "v5e-256": dict(topology="v5e:16x16", chips=256, runtime="v2-alpha-tpuv5-lite"),
}


def parse(arg, name, defaults):
    """``"key=value,key=value"`` over ``defaults``; ``slice`` must name one of :data:`SLICES`."""
    args = experiments_common.parse_arg(arg, defaults, name)
    if args["slice"] not in SLICES:
        raise ValueError(f"{name}: slice={args['slice']!r} is not one of {sorted(SLICES)}")
    return args


def common(config, slice_name, *, mesh, batch_size):
    """Settings every pod config shares: C4 through a subword tokenizer, AdamW, long intervals."""
    config.dataset = "c4/en"
    config.text_key = "text"
    config.train_split = "train"
    config.eval_split = "validation"
    config.data_dir = None  # TFDS default; on a pod pass --config.data_dir=gs://BUCKET/tfds
    config.stream_data = True  # tokenize c4's 365M documents as they are read, not all before step 0
    config.mesh = dict(mesh)
    config.batch_size = batch_size
    config.optimizer = dict(learning_rate=4e-4, warmup_steps=2000, end_learning_rate_ratio=0.1,
                            weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0)
    config.log_every_steps = 50
    config.eval_every_steps = 2000
    config.eval_batches = 16
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.progress_bar = False
    assert slice_name in SLICES
    return config
