"""S5 — Flan-MoE in small (Shen et al. 2023): instruction tuning helps MoE more than dense.

  python experiments/run_sweep.py s5_flan_moe              # size=small
  python experiments/run_sweep.py s5_flan_moe --size=full

One run alone (a tuning run takes the workdir of the run it starts from as ``init_from``):

  python -m moejax.main --config=experiments/s5_flan_moe.py:variant=pre_moe --workdir=runs/s5/pre_moe
  python -m moejax.main --config=experiments/s5_flan_moe.py:variant=it_moe,init_from=runs/s5/pre_moe \
      --workdir=runs/s5/it_moe
  python -m moejax.main --config=experiments/s5_flan_moe.py:variant=it_ft_moe,init_from=runs/s5/it_moe \
      --workdir=runs/s5/it_ft_moe

A dense LM (FFN 2f) and a FLOP-matched MoE (top-2 of 8 experts of width f, Mixtral routing) are
pretrained on ``stdlib_text`` (``pre_dense``, ``pre_moe``). From there, the three arms of Flan-MoE:

(i) ``ft_dense``, ``ft_moe``: fine-tuned directly on one downstream task, ``TASK`` (a family held
    out of instruction tuning; its ``task_<family>`` split, scored on ``eval_<family>``);
(ii) ``it_dense``, ``it_moe``: instruction-tuned on the ten ``instruct_synth`` training families,
    scored zero-shot on the held-out families;
(iii) ``it_ft_dense``, ``it_ft_moe``: the instruction-tuned models, then fine-tuned on ``TASK`` as in (i).

Ablations of the MoE's instruction tuning: ``it_moe_freeze_router`` (router fixed) and
``it_moe_no_aux`` (no auxiliary losses). Every tuned run reports, on the same held-out examples,
answer-token loss (teacher forcing; continuous, so it separates models while exact match is still
zero) and exact match of greedy answers.
"""

from experiments import common

SECTION = "S5"
TITLE = "Flan-MoE in small (instruction tuning, zero-shot on held-out task families)"
PRETRAIN = ("pre_dense", "pre_moe")
INSTRUCT = ("it_dense", "it_moe", "it_moe_freeze_router", "it_moe_no_aux")
TASK_TUNE = ("ft_dense", "ft_moe", "it_ft_dense", "it_ft_moe")
VARIANTS = PRETRAIN + INSTRUCT + TASK_TUNE
HELD_OUT = ("min", "subtract", "reverse_words")
TASK = "min"
NUM_SEEDS = 4
GROUP_LABEL = "run"
COLUMNS = ((("eval_loss", "val loss (own split)"),)
           + tuple((f"eval_answer_loss/{family}", f"answer loss: {family}") for family in HELD_OUT)
           + (("held_out_answer_loss_gain", "held-out answer loss drop in this run"),)
           + tuple((f"eval_exact_match/{family}", f"exact match: {family}") for family in HELD_OUT))
PLOT = (f"eval_answer_loss/{TASK}", "held_out_answer_loss_gain", f"eval_exact_match/{TASK}")
_MIN = f"eval_answer_loss/{TASK}"
# Differences per seed (plus groups minus minus groups); negative = the MoE's loss is lower.
COMPARISONS = (
    (f"(i) single-task fine-tuning, answer loss on {TASK}: MoE − dense", _MIN, ("ft_moe",),
     ("ft_dense",)),
    ("(ii) instruction tuning, held-out answer loss (zero-shot): MoE − dense",
     "held_out_answer_loss", ("it_moe",), ("it_dense",)),
    ("(ii) instruction tuning, held-out answer loss drop: MoE − dense",
     "held_out_answer_loss_gain", ("it_moe",), ("it_dense",)),
    (f"(iii) instruction tuning then fine-tuning, answer loss on {TASK}: MoE − dense", _MIN,
     ("it_ft_moe",), ("it_ft_dense",)),
    (f"what instruction tuning first adds to fine-tuning (answer loss on {TASK}, (i) − (iii)): "
     "dense", _MIN, ("ft_dense",), ("it_ft_dense",)),
    (f"what instruction tuning first adds to fine-tuning (answer loss on {TASK}, (i) − (iii)): "
     "MoE", _MIN, ("ft_moe",), ("it_ft_moe",)),
    ("ablation: frozen router − trained router, held-out answer loss", "held_out_answer_loss",
     ("it_moe_freeze_router",), ("it_moe",)),
    ("ablation: no auxiliary losses − with, held-out answer loss", "held_out_answer_loss",
     ("it_moe_no_aux",), ("it_moe",)),
)
PAPER = """\
Shen et al. 2023 (Flan-MoE), as summarised in issue 7: instruction tuning helps MoE models more than
dense models of the same FLOPs (their abstract: Flan-ST-MoE-32B surpasses Flan-PaLM-62B on four
benchmarks at about a third of the FLOPs), and MoE models fine-tuned directly on single tasks,
without instruction tuning, are weaker than dense ones. The paper also ablates freezing the gate or
the experts and the auxiliary losses during instruction tuning (sec. 4).
"""


def get_config(arg=None):
    args = common.parse_arg(arg, dict(size="small", seed="0", variant="pre_moe", init_from=""),
                            "s5_flan_moe.py")
    variant, size = args["variant"], args["size"]
    if variant not in VARIANTS:
        raise ValueError(f"s5_flan_moe.py: variant must be one of {VARIANTS}, got {variant!r}")
    config = common.base_config(size, int(args["seed"]), d_ff_multiple=2, moe_every=1)
    if "moe" in variant:
        config.moe = common.moe(num_experts=8, experts_per_token=2, d_ff=config.model.d_model,
                                router="mixtral", dispatch="dropless", gmm_backend=common.GMM_BACKEND,
                                load_balancing_weight=0.0 if variant.endswith("no_aux") else 0.01,
                                z_loss_weight=0.0 if variant.endswith("no_aux") else 1e-3)
    if variant in PRETRAIN:
        return config
    if not args["init_from"]:
        raise ValueError(f"s5_flan_moe.py: variant {variant!r} fine-tunes another run: pass "
                         f"init_from=<the workdir of {source_of(variant)}>")
    config.init_from = args["init_from"]
    config.freeze = "router" if variant.endswith("freeze_router") else "none"
    config.dataset = "instruct_synth"
    if variant in TASK_TUNE:
        config.train_split, config.eval_split = f"task_{TASK}", f"eval_{TASK}"
    config.seq_len = 128  # the longest instruction example
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0
    micro = size == "micro"
    config.instruct_eval = dict(families=HELD_OUT, num_examples=2 if micro else 32,
                                max_new_tokens=4 if micro else 24, seed=2)
    return config


def source_of(variant: str) -> str:
    """The variant whose final parameters ``variant`` starts from."""
    model = "moe" if "moe" in variant else "dense"
    return f"it_{model}" if variant.startswith("it_ft_") else f"pre_{model}"


def sweep(size="small"):
    runs = []
    for seed in common.seeds_for(size, NUM_SEEDS):
        for variant in VARIANTS:
            arg = f"size={size},seed={seed},variant={variant}"
            if variant not in PRETRAIN:
                arg += f",init_from={source_of(variant)}_seed{seed}"
            runs.append(common.Run(name=f"{variant}_seed{seed}", group=variant, seed=seed,
                                   arg=arg))
    return runs
