"""Instruction tuning (Flan-MoE) of the default MoE LM on synthetic tasks, zero-shot on held-out ones.

First pretrain (experiments/default.py), then fine-tune from its last checkpoint:

  python -m moejax.main --config=experiments/default.py --workdir=runs/default
  python -m moejax.main --config=experiments/instruct.py --workdir=runs/instruct

``instruct.py:freeze=router`` (or ``experts``, ``non_expert``) keeps that parameter group fixed, as in
Shen et al. 2023 (Flan-MoE), sec. 4; ``instruct.py:init_from=DIR`` fine-tunes another run. Evaluation
reports exact-match accuracy of greedy answers on the held-out task families (``min``, ``subtract``,
``reverse_words``) and on three trained neighbours (``max``, ``add``, ``reverse``).
"""

from experiments import common, default


def get_config(arg=None):
    args = common.parse_arg(arg, dict(freeze="none", init_from="runs/default"), "instruct.py")
    config = default.get_config()  # same model, so the checkpoint fits
    config.dataset = "instruct_synth"
    config.seq_len = 128  # the longest instruction example is 128 tokens
    config.batch_size = 16
    config.num_train_steps = 300
    config.init_from = args["init_from"]
    config.freeze = args["freeze"]
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 30
    config.optimizer.weight_decay = 0.0
    config.eval_every_steps = 100
    config.eval_batches = 4
    config.checkpoint_every_steps = 100
    config.instruct_eval = dict(
        families=("min", "subtract", "reverse_words", "max", "add", "reverse"),
        num_examples=32, max_new_tokens=40, seed=2)
    return config
