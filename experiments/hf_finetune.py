"""Fine-tune a Hugging Face MoE checkpoint (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) with the trainer.

  python -m moejax.main --config=experiments/hf_finetune.py:checkpoint=/path/to/ckpt \\
      --workdir=runs/ft --config.dataset=c4/en --config.data_dir=gs://my-bucket/tfds

The architecture comes from the checkpoint's ``config.json`` and the parameters from its
safetensors (``init_from = "hf:<checkpoint>"``); the tokenizer is the checkpoint's own
``tokenizer.json``. Arguments: ``checkpoint`` (required), ``dtype`` (compute and parameter dtype,
default bfloat16), ``dispatch`` (default dropless), ``steps`` (default 1000), ``lr`` (default 1e-5).
"""

from experiments import common


def get_config(arg=None):
    args = common.parse_arg(arg, dict(checkpoint="", dtype="bfloat16", dispatch="dropless",
                                      steps="1000", lr="1e-5"), "hf_finetune.py")
    if not args["checkpoint"]:
        raise ValueError("hf_finetune.py: give the checkpoint directory, e.g. "
                         "--config=experiments/hf_finetune.py:checkpoint=/path/to/ckpt")
    config = common.base()
    config.init_from = f"hf:{args['checkpoint']}"
    config.tokenizer = f"hf:{args['checkpoint'].rstrip('/')}/tokenizer.json"
    config.dataset = "stdlib_text"
    config.seq_len = 1024
    config.batch_size = 8
    config.num_train_steps = int(args["steps"])
    config.model = dict(dtype=args["dtype"], param_dtype=args["dtype"], remat=True)
    config.moe = dict(dispatch=args["dispatch"])
    config.optimizer.update(learning_rate=float(args["lr"]), warmup_steps=50,
                            end_learning_rate_ratio=0.1, weight_decay=0.0, grad_clip_norm=1.0)
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    return config
