"""S4 — router zoo at equal active parameters (DeepSeekMoE Table 1 analogue), and z-loss stability.

  python experiments/run_sweep.py s4_routers              # the committed results (size=small)
  python experiments/run_sweep.py s4_routers --size=full

One run alone:

  python -m moejax.main --config=experiments/s4_routers.py:variant=deepseek_v3,seed=0 \
      --workdir=runs/s4

Every variant has the dense model's active FFN width per token (2f, f = the expert width):
``dense`` (FFN 2f), ``hash`` and ``switch`` (top-1 of 8 experts of width 2f), ``gshard``, ``mixtral``
and ``noisy_top_k`` (top-2 of 8 experts of width f), ``deepseek_v3`` (one shared expert of width f
plus top-2 of 16 fine-grained experts of width f/2, sigmoid gates, bias balancing). The MoE models
have more total parameters than the dense one, as in the paper's comparison.

Stability: ``mixtral_lr_high`` and ``mixtral_lr_high_zloss`` train Mixtral routing at 10× the
learning rate without and with the router z-loss (ST-MoE), over more seeds; the table counts
divergences and loss spikes.

Expert choice is excluded: each expert picks its top tokens over the whole batch, so a token's
routing depends on later tokens of its sequence — in a causal decoder that leaks the future into the
training loss and the comparison would be unfair.
"""

from experiments import common

SECTION = "S4"
TITLE = "Router zoo at equal active parameters"
ZOO = ("dense", "hash", "switch", "gshard", "mixtral", "noisy_top_k", "deepseek_v3")
STABILITY = ("mixtral_lr_high", "mixtral_lr_high_zloss")
VARIANTS = ZOO + STABILITY
ZOO_SEEDS = 2
STABILITY_SEEDS = 2
HIGH_LR_FACTOR = 10.0
GROUP_LABEL = "router"
BASELINE_GROUP = "dense"
COLUMNS = (("eval_loss", "val loss"), ("delta_eval_loss", "Δ loss vs dense"),
           ("max_over_mean_load", "max/mean load"), ("loss_spikes", "loss spikes"),
           ("step_time_ms", "step time (ms)"))
PLOT = ("eval_loss", "max_over_mean_load")
ANALYZE_BALANCE = True
PAPER = """\
DeepSeekMoE (Dai et al. 2024), Table 1 (2B total parameters, equal total and activated parameters
across models, Pile loss and downstream tasks): Dense is worst, then Hash Layer, Switch, GShard, and
DeepSeekMoE best; its abstract adds that DeepSeekMoE 2B matches GShard 2.9B (1.5× the expert
parameters and compute). ST-MoE (Zoph et al. 2022): the router z-loss removes training
instabilities without hurting quality.
"""


def get_config(arg=None):
    args = common.parse_arg(arg, dict(size="small", seed="0", variant="mixtral"),
                            "s4_routers.py")
    variant, size = args["variant"], args["size"]
    if variant not in VARIANTS:
        raise ValueError(f"s4_routers.py: variant must be one of {VARIANTS}, got {variant!r}")
    config = common.base_config(size, int(args["seed"]), d_ff_multiple=2, moe_every=1)
    f = config.model.d_model  # expert width; the dense FFN is 2f
    moe = dict(num_experts=8, experts_per_token=2, d_ff=f, dispatch="dropless",
               gmm_backend=common.GMM_BACKEND, load_balancing_weight=0.01, z_loss_weight=1e-3)
    if variant == "dense":
        return config
    if variant in ("hash", "switch"):
        # hash: the table (moe.hash_vocab_size = 0) covers the model's vocabulary, whatever the tokenizer.
        moe.update(router=variant, experts_per_token=1, d_ff=2 * f)
    elif variant == "deepseek_v3":
        moe.update(router="deepseek_v3", num_experts=16, d_ff=f // 2, num_shared_experts=1,
                   shared_d_ff=f, sequence_balance_weight=1e-4)
    elif variant.startswith("mixtral_lr_high"):
        moe.update(router="mixtral",
                   z_loss_weight=1e-3 if variant.endswith("zloss") else 0.0)
        config.optimizer.learning_rate *= HIGH_LR_FACTOR
    else:
        moe["router"] = variant
    config.moe = common.moe(**moe)
    return config


def sweep(size="small"):
    return [common.Run(name=f"{variant}_seed{seed}", group=variant, seed=seed,
                       arg=f"size={size},seed={seed},variant={variant}")
            for variant in VARIANTS
            for seed in common.seeds_for(size, STABILITY_SEEDS if variant in STABILITY
                                           else ZOO_SEEDS)]
