"""S2 — more experts at fixed compute per token (Shazeer et al. 2017, Table 7), in small.

  python experiments/run_sweep.py s2_num_experts              # the committed results (size=small)
  python experiments/run_sweep.py s2_num_experts --size=full

One run alone:

  python -m moejax.main --config=experiments/s2_num_experts.py:variant=e32,seed=0 --workdir=runs/s2

Noisy top-4 gating with experts of fixed width, so every variant does the same expert FLOPs per
token; only the number of experts (the parameter count) grows: ``e4`` (k = E = 4, every expert on
every token: the paper's "MoE-4"), ``e8`` ... ``e64``, and ``e64_h`` (hierarchical noisy top-k:
8 groups of 8 experts, 2 groups per token, 2 experts in each).
"""

from experiments import common

SECTION = "S2"
TITLE = "More experts at fixed compute (Shazeer et al. 2017, Table 7)"
VARIANTS = ("e4", "e8", "e16", "e32", "e64", "e64_h")
EXPERTS_PER_TOKEN = 4
NUM_SEEDS = 2
GROUP_LABEL = "experts"
BASELINE_GROUP = "e4"
COLUMNS = (("eval_loss", "val loss"), ("delta_eval_loss", "Δ loss vs E=4"),
           ("max_over_mean_load", "max/mean load"), ("step_time_ms", "step time (ms)"))
PLOT = ("eval_loss", "max_over_mean_load")
ANALYZE_BALANCE = True
PAPER = """\
As quoted in issue 7 (Shazeer et al. 2017, Table 7, 1B Word, fixed ~8M ops per timestep): test
perplexity 45.0 (MoE-4, all experts active) → 39.7 → 35.7 → 34.6 → 34.1 as the number of experts grows
(the largest models hierarchical).
"""


def get_config(arg=None):
    args = common.parse_arg(arg, dict(size="small", seed="0", variant="e16"),
                            "s2_num_experts.py")
    variant, size = args["variant"], args["size"]
    if variant not in VARIANTS:
        raise ValueError(f"s2_num_experts.py: variant must be one of {VARIANTS}, got {variant!r}")
    config = common.base_config(size, int(args["seed"]))
    num_experts = int(variant[1:].split("_")[0])
    config.moe = common.moe(num_experts=num_experts, experts_per_token=EXPERTS_PER_TOKEN,
                            d_ff=config.model.d_model, router="noisy_top_k", dispatch="dropless",
                            gmm_backend=common.GMM_BACKEND, importance_weight=0.1, load_weight=0.1)
    if variant.endswith("_h"):
        config.moe.update(router="hierarchical_noisy_top_k", num_expert_groups=8, topk_groups=2)
    return config


def sweep(size="small"):
    return [common.Run(name=f"{variant}_seed{seed}", group=variant, seed=seed,
                       arg=f"size={size},seed={seed},variant={variant}")
            for variant in VARIANTS for seed in common.seeds_for(size, NUM_SEEDS)]
