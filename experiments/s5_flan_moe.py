"""S5 — Flan-MoE in small (Shen et al. 2023): instruction tuning helps MoE more than dense.

  python experiments/run_sweep.py s5_flan_moe              # size=small
  python experiments/run_sweep.py s5_flan_moe --size=full

One run alone (a fine-tuning run takes the pretraining run's workdir as ``init_from``):

  python -m moejax.main --config=experiments/s5_flan_moe.py:variant=pre_moe --workdir=runs/s5/pre_moe
  python -m moejax.main --config=experiments/s5_flan_moe.py:variant=it_moe,init_from=runs/s5/pre_moe \
      --workdir=runs/s5/it_moe

A dense LM (FFN 2f) and a FLOP-matched MoE (top-2 of 8 experts of width f, Mixtral routing) are
pretrained on ``stdlib_text`` (``pre_dense``, ``pre_moe``), then instruction-tuned on the
``instruct_synth`` training families (``it_dense``, ``it_moe``) and scored by exact match of greedy
answers on the held-out families (zero-shot) and on trained neighbours. Ablations of the MoE:
``it_moe_freeze_router`` (router fixed during instruction tuning) and ``it_moe_no_aux`` (no
auxiliary losses during instruction tuning).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "moejax_sweeplib", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweeplib.py"))
sweeplib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweeplib)

SECTION = "S5"
TITLE = "Flan-MoE in small (instruction tuning, zero-shot on held-out task families)"
PRETRAIN = ("pre_dense", "pre_moe")
TUNE = ("it_dense", "it_moe", "it_moe_freeze_router", "it_moe_no_aux")
VARIANTS = PRETRAIN + TUNE
HELD_OUT = ("min", "subtract", "reverse_words")
NEIGHBOURS = ("max", "add", "reverse")
NUM_SEEDS = 1
GROUP_LABEL = "run"
COLUMNS = (("eval_loss", "val loss"), ("eval_loss_gain", "val loss drop in this run")) + tuple(
    (f"eval_exact_match/{family}", f"{family}{' (held out)' if family in HELD_OUT else ''}")
    for family in HELD_OUT + NEIGHBOURS)
PLOT = ("eval_loss", "eval_exact_match/min", "eval_exact_match/max")
PAPER = """\
Shen et al. 2023 (Flan-MoE), as summarised in issue 7: instruction tuning helps MoE models more than
dense models of the same FLOPs (their abstract: Flan-ST-MoE-32B surpasses Flan-PaLM-62B on four
benchmarks at about a third of the FLOPs), and MoE models fine-tuned directly on single tasks,
without instruction tuning, are weaker than dense ones. The paper also ablates freezing the gate or
the experts and the auxiliary losses during instruction tuning (sec. 4).
"""


def get_config(arg=None):
    args = sweeplib.parse_args(arg, dict(size="small", seed="0", variant="pre_moe", init_from=""),
                               "s5_flan_moe.py")
    variant, size = args["variant"], args["size"]
    if variant not in VARIANTS:
        raise ValueError(f"s5_flan_moe.py: variant must be one of {VARIANTS}, got {variant!r}")
    config = sweeplib.base_config(size, int(args["seed"]), d_ff_multiple=2, moe_every=1)
    if "moe" in variant:
        config.moe = dict(num_experts=8, experts_per_token=2, d_ff=config.model.d_model,
                          router="mixtral", dispatch="dropless", gmm_backend=sweeplib.GMM_BACKEND,
                          load_balancing_weight=0.0 if variant.endswith("no_aux") else 0.01,
                          z_loss_weight=0.0 if variant.endswith("no_aux") else 1e-3)
    if variant in PRETRAIN:
        return config
    if not args["init_from"]:
        raise ValueError(f"s5_flan_moe.py: variant {variant!r} fine-tunes a pretrained run: pass "
                         "init_from=<its workdir>")
    config.init_from = args["init_from"]
    config.freeze = "router" if variant.endswith("freeze_router") else "none"
    config.dataset = "instruct_synth"
    config.seq_len = 128  # the longest instruction example
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0
    micro = size == "micro"
    config.instruct_eval = dict(families=HELD_OUT + NEIGHBOURS, num_examples=2 if micro else 32,
                                max_new_tokens=4 if micro else 24, seed=2)
    return config


def sweep(size="small"):
    runs = []
    for seed in sweeplib.seeds_for(size, NUM_SEEDS):
        for variant in VARIANTS:
            arg = f"size={size},seed={seed},variant={variant}"
            if variant in TUNE:
                source = "pre_moe" if "moe" in variant else "pre_dense"
                arg += f",init_from={source}_seed{seed}"
            runs.append(sweeplib.Run(name=f"{variant}_seed{seed}", group=variant, seed=seed,
                                     arg=arg))
    return runs
