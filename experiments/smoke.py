"""Tiny MoE LM for tests and a quick check that training runs: a few steps, seconds on one CPU core.

  python -m moejax.main --config=experiments/smoke.py --workdir=/tmp/moejax_smoke

``smoke.py:moe=False`` gives the dense model of the same shape.
"""

import ml_collections


def get_config(arg=None):
    args = dict(moe="True")
    if arg:
        args.update(part.split("=", 1) for part in arg.split(","))
    unknown = set(args) - {"moe"}
    if unknown:
        raise ValueError(f"smoke.py: unknown config argument(s) {sorted(unknown)}; known: moe")
    use_moe = args["moe"].lower() in ("1", "true", "yes")
    config = ml_collections.ConfigDict()
    config.dataset = "stdlib_text"
    config.seq_len = 32
    config.batch_size = 8
    config.num_train_steps = 6
    config.seed = 0
    config.model = dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_every=1)
    config.moe = dict(num_experts=4, experts_per_token=2, d_ff=32, router="mixtral",
                      dispatch="dropless") if use_moe else None
    config.optimizer = dict(learning_rate=1e-2, warmup_steps=2, end_learning_rate_ratio=0.1,
                            weight_decay=0.0, grad_clip_norm=1.0)
    config.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.eval_batches = 1
    config.checkpoint_every_steps = 3
    config.keep_checkpoints = 3
    config.progress_bar = False
    return config
