"""Small MoE language model on the Python standard library's source (``stdlib_text``, byte tokens).

  python -m moejax.main --config=experiments/default.py --workdir=runs/default

Dense baseline at equal active FLOPs (every FFN 512 wide = top-2 of 256-wide experts):

  python -m moejax.main --config=experiments/default.py:moe=False --workdir=runs/dense

4 layers, d_model 128; layers 1 and 3 are MoE (8 experts of width 256, top-2 Mixtral routing,
dropless dispatch), layers 0 and 2 dense. 1.7M parameters, 0.9M active per token. Sized to train
in about five minutes on two CPU cores; on an accelerator raise ``batch_size`` and the model.
"""

from experiments import common


def get_config(arg=None):
    args = common.parse_arg(arg, dict(moe="True"), "default.py")
    config = common.base()
    config.dataset = "stdlib_text"
    config.data_dir = None
    config.seq_len = 128
    config.batch_size = 16
    config.num_train_steps = 600
    config.seed = 0

    config.model = common.model(d_model=128, num_layers=4, num_heads=4, d_ff=512, moe_every=2,
                                dtype="float32", param_dtype="float32", remat=False,
                                scan_layers=False)
    if common.truthy(args["moe"]):
        config.moe = common.moe(num_experts=8, experts_per_token=2, d_ff=256, router="mixtral",
                                dispatch="dropless", expert="mlp", activation="gelu",
                                load_balancing_weight=0.01, z_loss_weight=1e-3)

    config.optimizer.update(learning_rate=3e-3, warmup_steps=60, end_learning_rate_ratio=0.1,
                            weight_decay=0.1, b1=0.9, b2=0.95, grad_clip_norm=1.0)

    config.log_every_steps = 10
    config.eval_every_steps = 150
    config.eval_batches = 8
    config.checkpoint_every_steps = 150
    config.keep_checkpoints = 3
    config.progress_bar = True
    return config
