"""S1 — balancing losses of noisy top-k gating (Shazeer et al. 2017, Table 6), in small.

  python experiments/run_sweep.py s1_balancing              # the committed results (size=small)
  python experiments/run_sweep.py s1_balancing --size=full  # larger model, longer training

One run alone (any size, seed, loss weights):

  python -m moejax.main --config=experiments/s1_balancing.py:w_importance=0.1,w_load=0.1,seed=0 \
      --workdir=runs/s1

Noisy top-2 gating over 16 experts (32 experts, top-4 at size=full) in the MoE layer of a small
byte-level LM on ``stdlib_text``; the grid is the paper's (w_importance, w_load). The runner measures
CV(Importance(X)), CV(Load(X)) and max/mean of the tokens per expert on validation batches with the
gating noise on (the paper measures them on training batches).
"""

from experiments import common

SECTION = "S1"
TITLE = "Balancing losses (Shazeer et al. 2017, Table 6)"
GRID = ((0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1), (0.01, 0.01), (1.0, 1.0))
NUM_SEEDS = 2
GROUP_LABEL = "w_importance, w_load"
COLUMNS = (("eval_loss", "val loss"), ("eval_perplexity", "val ppl (bytes)"),
           ("cv_importance", "CV(Importance)"), ("cv_load", "CV(Load)"),
           ("max_over_mean_load", "max/mean load"))
PLOT = ("eval_loss", "max_over_mean_load")
ANALYZE_BALANCE = True
PAPER = """\
| w_importance, w_load | test ppl (words) | CV(Importance) | CV(Load) | max/mean load |
|---|---|---|---|---|
| 0, 0 | 39.8 | 3.04 | 3.01 | 17.80 |
| 0.2, 0 | 35.6 | 0.06 | 0.17 | 1.47 |
| 0, 0.2 | 35.7 | 0.22 | 0.04 | 1.15 |
| 0.1, 0.1 | 35.6 | 0.06 | 0.05 | 1.14 |
| 0.01, 0.01 | 35.7 | 0.48 | 0.11 | 1.37 |
| 1, 1 | 35.7 | 0.03 | 0.02 | 1.07 |
"""


def get_config(arg=None):
    args = common.parse_arg(arg, dict(size="small", seed="0", w_importance="0.1", w_load="0.1"),
                            "s1_balancing.py")
    size = args["size"]
    config = common.base_config(size, int(args["seed"]))
    full = size == "full"
    config.moe = common.moe(num_experts=32 if full else 16, experts_per_token=4 if full else 2,
                            d_ff=config.model.d_model, router="noisy_top_k", dispatch="dropless",
                            gmm_backend=common.GMM_BACKEND,
                            importance_weight=float(args["w_importance"]),
                            load_weight=float(args["w_load"]))
    return config


def sweep(size="small"):
    return [common.Run(name=f"imp{wi:g}_load{wl:g}_seed{seed}", group=f"{wi:g}, {wl:g}",
                       seed=seed, arg=f"size={size},seed={seed},w_importance={wi},w_load={wl}")
            for wi, wl in GRID for seed in common.seeds_for(size, NUM_SEEDS)]
