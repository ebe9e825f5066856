"""The Colab notebooks: committed with their outputs, installable in one cell, each runs top to bottom.

The committed outputs (``tools/render_notebooks.py``) must match the code in structure: every cell
ran, in order, and every cell that draws has an image; no output holds a machine's path, a log
stream or a secret. Execution uses ``nbclient`` on one CPU device with a per-cell time limit:
notebooks 02-05 with a ``python3`` kernel from this interpreter's environment, notebook 01 with a
kernel in a fresh virtual environment where moejax comes only from the built wheel (what a Colab
user installs).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_quickstart", "02_routers", "03_dropless_kernels", "04_train_small_moe",
         "05_vision_moe")
MAX_NOTEBOOK_BYTES = 400_000
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


# Where a path of some machine would show: home and temporary directories, virtual environments.
MACHINE_PATH = re.compile(r"(/root/|/home/|/Users/|/tmp/|/var/folders/|[A-Za-z]:\\Users\\"
                          r"|site-packages|\.venv/)")
SECRET = re.compile(r"(api[_-]?key|secret|password|token)\s*[=:]\s*\S{8,}|gh[pousr]_[A-Za-z0-9]{20,}"
                    r"|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----", re.IGNORECASE)
DRAWS = re.compile(r"\bplt\.show\(\)")


def _output_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return "\n".join(v for k, v in data.items() if k.startswith("text/") and isinstance(v, str))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_with_outputs_that_match_its_code(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    # Run top to bottom in one kernel: execution counts 1, 2, 3, ...
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), name
    for cell in code:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        if DRAWS.search(cell.source):
            assert len(images) >= len(DRAWS.findall(cell.source)), cell.source[:80]
        for output in cell.outputs:
            assert output.get("output_type") != "error", cell.source[:80]
            assert not (output.get("output_type") == "stream" and output.get("name") == "stderr")
            text = _output_text(output)
            assert not MACHINE_PATH.search(text), (name, MACHINE_PATH.search(text).group(0))
            assert not SECRET.search(text), name
    assert (NOTEBOOKS / f"{name}.ipynb").stat().st_size < MAX_NOTEBOOK_BYTES


def test_the_output_checks_catch_paths_secrets_and_missing_plots():
    assert MACHINE_PATH.search("prepared to /root/.cache/moejax/tfds/x")
    assert MACHINE_PATH.search("C:\\Users\\me\\moejax")
    assert not MACHINE_PATH.search("loss 0.52 at step 300")
    assert SECRET.search("api_key = sk_live_0123456789abcdef")
    assert not SECRET.search("tokens per expert: 12 8 3")
    assert len(DRAWS.findall("plt.show()\nplt.show()")) == 2


@pytest.mark.parametrize("name", NAMES)
def test_first_code_cell_installs_in_colab_and_reports_the_device(name):
    setup = _code_cells(_read(name))[0]
    assert setup == _code_cells(_read(NAMES[0]))[0]  # one install cell, the same everywhere
    assert 'if "google.colab" in sys.modules or MOEJAX_WHEEL:' in setup
    assert 'MOEJAX_REPO = ""' in setup
    assert "jax.default_backend()" in setup


def _run_install_cell(monkeypatch, tmp_path, *, repo="", wheel_env=None, uploaded=()):
    """The install cell's pip command in a simulated Colab (no pip is run)."""
    import types

    setup = _code_cells(_read(NAMES[0]))[0].replace('MOEJAX_REPO = ""', f"MOEJAX_REPO = {repo!r}")
    setup = setup.replace('"/content/moejax-*.whl"', repr(str(tmp_path / "moejax-*.whl")))
    for name in uploaded:
        (tmp_path / name).write_bytes(b"")
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr("subprocess.run", lambda args, check: calls.append(args))
    monkeypatch.setattr("shutil.which", lambda name: None)
    if wheel_env is None:
        monkeypatch.delenv("MOEJAX_WHEEL", raising=False)
    else:
        monkeypatch.setenv("MOEJAX_WHEEL", wheel_env)
    exec(compile(setup, "install-cell", "exec"), {})
    [args] = calls
    assert args[:4] == [sys.executable, "-m", "pip", "install"]
    return args[-1]


def test_install_cell_takes_an_uploaded_wheel_or_the_repository_url(monkeypatch, tmp_path):
    got = _run_install_cell(monkeypatch, tmp_path, repo="https://example.org/me/moejax",
                            uploaded=["moejax-0.1.0-py3-none-any.whl"])
    assert got == f"moejax @ file://{tmp_path}/moejax-0.1.0-py3-none-any.whl"
    got = _run_install_cell(monkeypatch, tmp_path / "none", repo="https://example.org/me/moejax")
    assert got == "moejax @ git+https://example.org/me/moejax"
    got = _run_install_cell(monkeypatch, tmp_path, wheel_env="/w/moejax-0.2.0-py3-none-any.whl")
    assert got == "moejax @ file:///w/moejax-0.2.0-py3-none-any.whl"
    with pytest.raises(SystemExit, match="Set MOEJAX_REPO"):
        _run_install_cell(monkeypatch, tmp_path / "none")


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


def _execute(nb, kernel_name: str, env: dict[str, str]):
    import nbclient

    # Proves the kernel runs in the intended environment.
    nb.cells.append(nbformat.v4.new_code_cell(
        "import sys, moejax; print(sys.prefix); print(moejax.__file__)"))
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)
    prefix, module = nb.cells[-1].outputs[0].text.split()
    setup_cell = next(c for c in nb.cells if c.cell_type == "code")
    setup_text = "".join(o.get("text", "") for o in setup_cell.outputs)
    assert "on CPU: 1 x cpu" in setup_text
    return prefix, module


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES[1:])
def test_notebook_runs_top_to_bottom_on_cpu(name):
    nb = _read(name)
    prefix, _ = _execute(nb, "python3", _kernel_env())
    assert prefix == sys.prefix


@pytest.mark.slow
def test_quickstart_runs_in_a_fresh_venv_with_moejax_from_the_built_wheel(tmp_path, monkeypatch):
    """``pip wheel .``, a new venv holding only that wheel's moejax (its dependencies come from this
    environment's site-packages), a Jupyter kernel in that venv, and notebook 01 top to bottom."""
    import json
    import subprocess
    import zipfile

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("moejax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = next((venv / "lib").glob("python*/site-packages"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    # This environment's moejax is an editable finder, which PYTHONPATH entries do not run.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    kernels = tmp_path / "jupyter" / "kernels" / "moejax-wheel"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f",
                 "{connection_file}"],
        "display_name": "moejax from the wheel", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    env = dict(_kernel_env(), PYTHONPATH=os.pathsep.join(deps))
    prefix, module = _execute(_read(NAMES[0]), "moejax-wheel", env)
    assert prefix == str(venv)
    assert module.startswith(str(target)), module
