"""Evaluation during training: one callable built from the setup, run at step 0, every
``eval_every_steps`` and at the end.

The language-model evaluation always runs: token cross-entropy and perplexity on the first
``eval_batches`` batches of ``eval_split`` (the same batches every time) and, for MoE models, the
per-layer expert load. ``config.instruct_eval`` (a dict) adds the instruction-tuning evaluation:
answer-token loss (teacher forcing) and exact match of greedy answers, per task family.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from moejax import data as data_lib
from moejax import parallel
from moejax.data import instruct_synth
from moejax.models.generate import greedy_generate
from moejax.trainer.state import TrainSetup
from moejax.trainer.step import jit_eval_step


class Evaluator:
    """``evaluator(state) -> {"eval_loss", "eval_perplexity", ...}``."""

    def __init__(self, setup: TrainSetup, eval_iter):
        self.setup, self.config = setup, setup.config
        self.eval_iter, self.start = eval_iter, eval_iter.get_state()
        self.step = jit_eval_step(setup)
        self.tokenizer = setup.tokenizer

    def __call__(self, state) -> dict[str, Any]:
        result = self.language_model(state)
        if self.config.instruct_eval is not None:
            result.update(self.answer_loss(state))
            result.update(self.exact_match(state))
        return result

    def _sums(self, state, batch) -> dict[str, np.ndarray]:
        batch = parallel.shard_batch(batch, self.setup.mesh, self.setup.rules)
        out = self.step(state["params"], state["rest"], self.setup.rng_state, batch)
        return {k: np.asarray(v, np.float64) for k, v in jax.device_get(out).items()}

    def language_model(self, state) -> dict[str, Any]:
        self.eval_iter.set_state(self.start)
        sums: dict[str, Any] = {}
        num_batches = 0
        for _ in range(self.config.eval_batches):
            try:
                batch = next(self.eval_iter)
            except StopIteration:
                break
            num_batches += 1
            for name, value in self._sums(state, batch).items():
                sums[name] = sums.get(name, 0.0) + value
        if not sums or sums["weight_sum"] == 0:
            raise ValueError(f"dataset {self.config.dataset!r} has no validation tokens to evaluate")
        eval_loss = float(sums["ce_sum"] / sums["weight_sum"])
        result = {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700.0))}
        if "tokens_per_expert" in sums:
            load_LxE = sums["tokens_per_expert"]
            share_LxE = load_LxE / np.maximum(load_LxE.sum(axis=1, keepdims=True), 1.0)
            result["eval_expert_load"] = share_LxE.tolist()
            result["eval_load_cv"] = (load_LxE.std(axis=1)
                                      / np.maximum(load_LxE.mean(axis=1), 1e-12)).tolist()
            result["eval_dropped_fraction"] = (sums["dropped_fraction"] / num_batches).tolist()
        return result

    def families(self) -> tuple[str, ...]:
        return tuple(self.config.instruct_eval.families or instruct_synth.HELD_OUT_FAMILIES)

    def answer_loss(self, state) -> dict[str, float]:
        """Mean answer-token cross-entropy (teacher forcing) per family of ``config.instruct_eval``.

        The same examples as the exact-match score; a continuous measure of how close a model is to
        the answers while exact match is still at zero. Batches of ``batch_size`` rows, the last one
        padded with rows of weight 0; each process feeds its block of every batch.
        """
        config, ie = self.config, self.config.instruct_eval
        local = config.batch_size // jax.process_count()
        first = jax.process_index() * local
        pad = self.tokenizer.pad_id  # filler rows: all padding, weight 0
        blank = {"inputs": np.full(config.seq_len, pad, np.int32),
                 "targets": np.full(config.seq_len, pad, np.int32),
                 "weights": np.zeros(config.seq_len, np.float32)}
        out = {}
        for family in self.families():
            rows = [data_lib.instruct_row(prompt, answer, config.seq_len, self.tokenizer)
                    for prompt, answer
                    in instruct_synth.make_examples(family, ie.num_examples, ie.seed)]
            ce_sum = weight_sum = 0.0
            for start in range(0, len(rows), config.batch_size):
                chunk = rows[start:start + config.batch_size]
                chunk += [blank] * (config.batch_size - len(chunk))
                mine = chunk[first:first + local]
                sums = self._sums(state, {key: np.stack([row[key] for row in mine])
                                          for key in blank})
                ce_sum += float(sums["ce_sum"])
                weight_sum += float(sums["weight_sum"])
            out[f"eval_answer_loss/{family}"] = ce_sum / weight_sum
        return out

    def exact_match(self, state) -> dict[str, float]:
        """Exact-match accuracy of greedy answers for each family of ``config.instruct_eval``."""
        from flax import nnx

        ie, tok = self.config.instruct_eval, self.tokenizer
        model = nnx.merge(self.setup.eval_graphdef, state["params"], self.setup.rng_state,
                          state["rest"])

        # Decoding feeds one token per row: the rows must split over the mesh's token axes.
        shape = self.setup.mesh.shape
        multiple = math.prod(shape.get(axis, 1) for axis in ("data", "fsdp", "expert"))

        def generate(prompts):
            ids = [tok.encode(p, bos=True) for p in prompts]
            ids += [np.array([tok.bos_id], np.int32)] * (-len(ids) % multiple)  # filler rows
            outs = greedy_generate(model, ids, max_new_tokens=ie.max_new_tokens,
                                   length=self.config.seq_len, eos_id=tok.eos_id, pad_id=tok.pad_id)
            return [tok.decode(o) for o in outs[:len(prompts)]]

        return {f"eval_exact_match/{family}": instruct_synth.exact_match_accuracy(
            generate, family, ie.num_examples, ie.seed) for family in self.families()}
