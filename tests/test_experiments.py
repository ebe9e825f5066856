"""The paper-reproduction sweeps (experiments/s*.py) build, and the runner works end to end."""

import json
import math
import os
import re

import pytest

from experiments import run_sweep
from moejax import trainer
from moejax.trainer.config import complete_config, make_model_config

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")

# The trainer uses optax, which relies on implicit dtype promotion (float ** int32 step counts).
pytestmark = pytest.mark.dtype_promotion("standard")

SWEEPS = sorted(f[:-3] for f in os.listdir(EXPERIMENTS)
                if f.startswith("s") and f[1].isdigit() and f.endswith(".py"))


def test_there_is_one_sweep_per_result_s1_to_s5():
    assert [name[:2] for name in SWEEPS] == ["s1", "s2", "s3", "s4", "s5"]


@pytest.mark.parametrize("name", SWEEPS)
@pytest.mark.parametrize("size", ["micro", "small", "long", "full"])
def test_every_run_of_a_sweep_builds_a_valid_model_config(name, size):
    sweep = run_sweep.load_sweep(name)
    runs = sweep.sweep(size)
    assert len({run.name for run in runs}) == len(runs)
    for run in runs:
        config = sweep.get_config(run.arg)
        if size == "micro":
            assert config.num_train_steps == 2
        make_model_config(complete_config(config))  # raises on a bad field


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_tables_only_name_columns_the_runner_produces(name):
    sweep = run_sweep.load_sweep(name)
    known = {"eval_loss", "eval_perplexity", "delta_eval_loss", "cv_importance", "cv_load",
             "max_over_mean_load", "train_dropped_fraction", "eval_dropped_fraction",
             "step_time_ms", "loss_spikes", "final_train_loss", "initial_eval_loss",
             "eval_loss_gain", "held_out_answer_loss", "held_out_answer_loss_gain"}
    keys = [key for key, _ in sweep.COLUMNS]
    assert all(key in known or key.startswith(("eval_exact_match/", "eval_answer_loss/"))
               for key in keys)
    assert set(sweep.PLOT) <= set(keys)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_comparisons_name_groups_of_the_sweep(name):
    sweep = run_sweep.load_sweep(name)
    groups = {run.group for run in sweep.sweep("small")}
    for _, _, plus, minus in getattr(sweep, "COMPARISONS", ()):
        assert set(plus) | set(minus) <= groups


def test_paired_differences_pair_runs_by_seed_and_skip_incomplete_seeds():
    def run(group, seed, loss):
        return {"group": group, "seed": seed, "loss": loss}

    results = [run("a", 0, 3.0), run("b", 0, 1.0), run("c", 0, 0.5),
               run("a", 1, 5.0), run("b", 1, 2.0), run("c", 1, 1.0),
               run("a", 2, 9.0)]  # seed 2 lacks b and c: left out
    rows = run_sweep.paired_differences(results, [("a - b", "loss", ("a",), ("b",)),
                                                  ("a + c - b", "loss", ("a", "c"), ("b",))])
    # a - b per seed: 2, 3 -> mean 2.5, std 0.5; a + c - b: 2.5, 4 -> 3.25, 0.75.
    assert [row["value"] for row in rows] == [{"mean": 2.5, "std": 0.5, "n": 2},
                                              {"mean": 3.25, "std": 0.75, "n": 2}]
    assert "| a - b | 2 | 2.500 ± 0.500 |" in run_sweep.comparison_table(rows)


def test_unknown_config_argument_is_rejected():
    sweep = run_sweep.load_sweep("s1_balancing")
    with pytest.raises(ValueError, match="w_loadd"):
        sweep.get_config("w_loadd=0.1")


def test_unknown_sweep_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="s1_balancing"):
        run_sweep.load_sweep("s9_nothing")


def test_runner_trains_writes_json_table_plot_and_results_block_then_resumes(tmp_path,
                                                                             monkeypatch):
    results_md = tmp_path / "RESULTS.md"
    # size=small results fill the s1_balancing block; other sizes a block of their own.
    results_md.write_text("# R\n<!-- BEGIN s1_balancing -->\nsmall\n<!-- END s1_balancing -->\n"
                          "<!-- BEGIN s1_balancing-micro -->\nold\n<!-- END s1_balancing-micro -->\ntail\n")
    kwargs = dict(size="micro", only="imp0.1_load0.1", workroot=str(tmp_path / "runs"),
                  results_root=str(tmp_path / "results"), results_md=str(results_md))
    pooled = run_sweep.run_sweep("s1_balancing", **kwargs)

    out = tmp_path / "results" / "s1_balancing-micro"
    record = json.loads((out / "runs" / "imp0.1_load0.1_seed0.json").read_text())
    assert math.isfinite(record["eval_loss"]) and not record["diverged"]
    assert record["max_over_mean_load"] >= 1.0 and record["cv_load"] >= 0.0
    assert [row["group"] for row in pooled["groups"]] == ["0.1, 0.1"]
    assert (out / "s1_balancing.png").stat().st_size > 0
    assert "| 0.1, 0.1 | 1 |" in (out / "table.md").read_text()
    text = results_md.read_text()
    assert "old" not in text and "| 0.1, 0.1 | 1 |" in text and text.endswith("tail\n")
    assert "<!-- BEGIN s1_balancing -->\nsmall\n<!-- END s1_balancing -->" in text
    assert "--size=micro" in text

    # A second call trains nothing: the run's JSON exists.
    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("trained a finished run"))
    run_sweep.run_sweep("s1_balancing", **kwargs)


def test_flan_moe_chain_pretrain_instruct_then_task_tune_records_answer_losses(tmp_path):
    kwargs = dict(size="micro", only="^(pre_moe|it_moe|it_ft_moe)_seed0$",
                  workroot=str(tmp_path / "runs"), results_root=str(tmp_path / "results"),
                  results_md=str(tmp_path / "RESULTS.md"))
    run_sweep.run_sweep("s5_flan_moe", **kwargs)
    runs = tmp_path / "results" / "s5_flan_moe-micro" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [
        "it_ft_moe_seed0.json", "it_moe_seed0.json", "pre_moe_seed0.json"]
    it_ft = json.loads((runs / "it_ft_moe_seed0.json").read_text())
    assert it_ft["config"]["init_from"] == str(tmp_path / "runs" / "s5_flan_moe-micro" / "it_moe_seed0")
    assert it_ft["config"]["train_split"] == "task_min"
    for record in (it_ft, json.loads((runs / "it_moe_seed0.json").read_text())):
        losses = [record[f"eval_answer_loss/{family}"] for family in ("min", "subtract", "reverse_words")]
        assert all(math.isfinite(loss) and loss > 0 for loss in losses)
        assert math.isclose(record["held_out_answer_loss"], sum(losses) / 3)
        assert math.isfinite(record["held_out_answer_loss_gain"])


@pytest.mark.parametrize("results_md", ["experiments/RESULTS.md", "benchmarks/RESULTS.md"])
def test_committed_results_link_only_images_that_exist(results_md):
    path = os.path.join(os.path.dirname(EXPERIMENTS), results_md)
    with open(path) as f:
        text = f.read()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links
    for link in links:
        assert os.path.isfile(os.path.join(os.path.dirname(path), link)), link


def test_committed_results_have_a_filled_block_per_sweep():
    with open(os.path.join(EXPERIMENTS, "RESULTS.md")) as f:
        text = f.read()
    for name in SWEEPS:
        section = f"## S{name[1]} "
        assert section in text
        block = text.split(f"<!-- BEGIN {name} -->", 1)[1].split(f"<!-- END {name} -->", 1)[0]
        assert f"Command: `python experiments/run_sweep.py {name}`" in block
        assert "| seeds |" in block


def test_committed_benchmark_results_are_what_report_py_writes_from_the_committed_data(
        tmp_path, monkeypatch, capsys):
    """benchmarks/RESULTS.md is generated: no number in it is typed by hand or left stale."""
    import importlib.util

    root = os.path.dirname(EXPERIMENTS)
    spec = importlib.util.spec_from_file_location(
        "benchmarks_report", os.path.join(root, "benchmarks", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    monkeypatch.setattr(report, "HERE", str(tmp_path))  # RESULTS still reads the committed data
    report.main()
    with open(os.path.join(root, "benchmarks", "RESULTS.md")) as f:
        committed = f.read()
    assert (tmp_path / "RESULTS.md").read_text() == committed


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_moe_layer_benchmark_step_cases_compute_what_they_claim(activation):
    """``moe_layer.py --steps``: the k-copies FFN and the router-less experts give the loss of a
    per-token NumPy loop over the same fixed routing, and gradients for the input and weights."""
    import importlib.util

    import jax
    import jax.numpy as jnp
    import numpy as np

    root = os.path.dirname(EXPERIMENTS)
    spec = importlib.util.spec_from_file_location(
        "benchmarks_moe_layer", os.path.join(root, "benchmarks", "moe_layer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    num_tokens, d, f, num_experts, k = 48, 16, 8, 4, 2
    x = np.asarray(jax.random.normal(jax.random.key(1), (num_tokens, d)))
    key = jax.random.key(0)
    indices, gates = (np.asarray(a) for a in bench._fixed_routing(
        num_tokens, num_experts, k, jax.random.split(key, 3)[2]))
    act = {"relu": lambda h: np.maximum(h, 0.0),
           "gelu": lambda h: 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))}[activation]
    for case, per_expert in ((bench.copies_ffn_case, False), (bench.experts_gmm_case, True)):
        fn, params = case(num_tokens, d, f, num_experts, k, activation, key)
        (loss, (d_params, d_x)) = fn(params, x)
        w_in, w_out = (np.asarray(params[name], np.float64) for name in ("w_in", "w_out"))
        y = np.zeros((num_tokens, d))
        for t in range(num_tokens):
            for j in range(k):
                e = indices[t, j]
                wi, wo = (w_in[e], w_out[e]) if per_expert else (w_in, w_out)
                y[t] += gates[t, j] * (act(x[t] @ wi) @ wo)
        np.testing.assert_allclose(float(loss), np.sum(y ** 2), rtol=1e-4)
        assert d_x.shape == x.shape and d_params["w_in"].shape == params["w_in"].shape
        assert np.all(np.isfinite(np.asarray(d_x))) and np.any(np.asarray(d_params["w_out"]) != 0)

        # Gradients against autodiff of the same per-token loop in jnp (each token's k experts'
        # weights gathered; no code of the benchmark or of moejax).
        def reference(params, x):
            w_in, w_out = params["w_in"], params["w_out"]
            if not per_expert:
                w_in, w_out = w_in[None], w_out[None]
            e = indices if per_expert else np.zeros_like(indices)
            jact = {"relu": jax.nn.relu,
                    "gelu": lambda h: jax.nn.gelu(h, approximate=False)}[activation]
            h = jact(jnp.einsum("td,tkdf->tkf", x, w_in[e]))
            y = jnp.einsum("tk,tkd->td", gates, jnp.einsum("tkf,tkfd->tkd", h, w_out[e]))
            return jnp.sum(y ** 2)

        want_params, want_x = jax.grad(reference, argnums=(0, 1))(params, jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(d_x), np.asarray(want_x), rtol=1e-4, atol=1e-4)
        for name in ("w_in", "w_out"):
            np.testing.assert_allclose(np.asarray(d_params[name]), np.asarray(want_params[name]),
                                       rtol=1e-4, atol=1e-4)
