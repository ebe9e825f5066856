"""S3 — dropless MoE vs token dropping (Gale et al. 2022, "MegaBlocks", Fig. 2 and 8), in small.

  python experiments/run_sweep.py s3_dropless              # the committed results (size=small)
  python experiments/run_sweep.py s3_dropless --size=full

One run alone:

  python -m moejax.main --config=experiments/s3_dropless.py:variant=cf1.0,seed=0 --workdir=runs/s3

Top-1 (Switch) routing over 16 experts in every FFN block (64 experts at size=full), each expert as
wide as the dense baseline's FFN, so every variant has the dense model's active FLOPs per token.
Variants: ``dense`` (no MoE), ``cf1.0`` / ``cf1.5`` / ``cf2.0`` (capacity dispatch, tokens over
capacity dropped: their FFN output is zero and only the residual passes) and ``dropless``.
"""

from experiments import common

SECTION = "S3"
TITLE = "Dropless vs token dropping (MegaBlocks)"
VARIANTS = ("dense", "cf1.0", "cf1.5", "cf2.0", "dropless")
NUM_SEEDS = 2
GROUP_LABEL = "variant"
BASELINE_GROUP = "dense"
COLUMNS = (("eval_loss", "val loss"), ("delta_eval_loss", "Δ loss vs dense"),
           ("train_dropped_fraction", "dropped (train)"),
           ("eval_dropped_fraction", "dropped (val)"), ("step_time_ms", "step time (ms)"))
PLOT = ("eval_loss", "train_dropped_fraction", "step_time_ms")
PAPER = """\
As summarised in issue 7 (Gale et al. 2022, Fig. 2 and 8, GPT-style MoEs on The Pile, 64 experts):
capacity factor 1 improves validation loss over the dense model by 0.15, dropless by 0.26, and
dropless MoE trains 1.38× faster than the best token-dropping configuration (MegaBlocks kernels on
A100 vs Tutel).
"""


def get_config(arg=None):
    args = common.parse_arg(arg, dict(size="small", seed="0", variant="dropless"),
                            "s3_dropless.py")
    variant, size = args["variant"], args["size"]
    if variant not in VARIANTS:
        raise ValueError(f"s3_dropless.py: variant must be one of {VARIANTS}, got {variant!r}")
    config = common.base_config(size, int(args["seed"]), moe_every=1)
    if variant == "dense":
        return config
    capacity = variant.startswith("cf")
    config.moe = common.moe(num_experts=64 if size == "full" else 16, experts_per_token=1,
                            d_ff=config.model.d_ff, router="switch",
                            dispatch="capacity" if capacity else "dropless",
                            capacity_factor=float(variant[2:]) if capacity else 1.0,
                            gmm_backend=common.GMM_BACKEND,
                            load_balancing_weight=0.01, z_loss_weight=1e-3)
    return config


def sweep(size="small"):
    return [common.Run(name=f"{variant}_seed{seed}", group=variant, seed=seed,
                       arg=f"size={size},seed={seed},variant={variant}")
            for variant in VARIANTS for seed in common.seeds_for(size, NUM_SEEDS)]
