"""The Colab notebooks: committed without outputs, Colab-ready, and each runs top to bottom on a CPU.

Execution uses ``nbclient`` with a ``python3`` kernel started from this interpreter's environment
(checked from inside the kernel), on one CPU device, with a per-cell time limit.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_quickstart", "02_routers", "03_dropless_kernels", "04_train_small_moe")
CELL_TIMEOUT_S = 180


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _kernel_env() -> dict[str, str]:
    """This environment on one CPU device (conftest's fake device count is for the unit tests)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.pop("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_and_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", NAMES)
def test_first_code_cell_installs_in_colab_and_reports_the_device(name):
    setup = _code_cells(_read(name))[0]
    assert 'if "google.colab" in sys.modules:' in setup
    assert '"-m", "pip", "install"' in setup and "MOEJAX_SOURCE" in setup
    assert "jax.default_backend()" in setup


def test_training_notebook_trains_the_smoke_config():
    if importlib.util.find_spec("ml_collections") is None:
        pytest.skip("ml_collections is not installed")
    from experiments import smoke
    from moejax.trainer.config import complete_config
    from moejax.trainer.workdir import flat_config

    [config_cell] = [c for c in _code_cells(_read("04_train_small_moe"))
                     if c.startswith("config = ml_collections.ConfigDict()")]
    namespace = {"ml_collections": __import__("ml_collections")}
    exec(config_cell.replace("print(config)", ""), namespace)
    schedule = ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                "keep_checkpoints")
    expected = {k: v for k, v in flat_config(complete_config(smoke.get_config()).to_dict()).items()
                if k not in schedule}
    got = {k: v for k, v in flat_config(complete_config(namespace["config"]).to_dict()).items()
           if k not in schedule}
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_on_cpu(name):
    import nbclient

    if name == "04_train_small_moe" and importlib.util.find_spec("moejax.trainer") is None:
        pytest.skip("moejax.trainer (the trainer the notebook runs) is not in this checkout")
    nb = _read(name)
    # Proves the kernel runs in this environment (the kernelspec's "python" could be another one).
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=_kernel_env())
    [prefix_output] = nb.cells[-1].outputs
    assert prefix_output.text.strip() == sys.prefix
    setup_cell = next(c for c in nb.cells if c.cell_type == "code")
    setup_text = "".join(o.get("text", "") for o in setup_cell.outputs)
    assert "on CPU: 1 x cpu" in setup_text
