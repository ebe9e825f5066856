"""Tiny MoE LM for tests and a quick check that training runs: a few steps, seconds on one CPU core.

  python -m moejax.main --config=experiments/smoke.py --workdir=/tmp/moejax_smoke

``smoke.py:moe=False`` gives the dense model of the same shape.
"""

from experiments import common


def get_config(arg=None):
    args = common.parse_arg(arg, dict(moe="True"), "smoke.py")
    config = common.base()
    config.dataset = "stdlib_text"
    config.seq_len = 32
    config.batch_size = 8
    config.num_train_steps = 6
    config.seed = 0
    config.model = common.model(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_every=1)
    if common.truthy(args["moe"]):
        config.moe = common.moe(num_experts=4, experts_per_token=2, d_ff=32, router="mixtral",
                                    dispatch="dropless")
    config.optimizer.update(learning_rate=1e-2, warmup_steps=2, end_learning_rate_ratio=0.1,
                            weight_decay=0.0, grad_clip_norm=1.0)
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.eval_batches = 1
    config.checkpoint_every_steps = 3
    config.keep_checkpoints = 3
    config.progress_bar = False
    return config
