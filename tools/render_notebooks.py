"""Execute the notebooks on the CPU and commit them with their outputs (plots, tables).

  python tools/render_notebooks.py                  # every notebook in notebooks/
  python tools/render_notebooks.py 05_vision_moe    # one

Each notebook runs top to bottom in a fresh ``python3`` kernel on one CPU device. What the reader
should not see is left out of the saved outputs: stderr streams (library logs, progress bars), and
any output holding a path of this machine (home, temporary or environment directories). The
datasets the notebooks read are prepared first, so no preparation log lands in a cell. PNG plots
are kept as the kernel drew them (matplotlib's inline backend).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import tempfile
import time

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 600


def machine_paths() -> list[str]:
    """Directory prefixes that identify this machine and must not appear in a committed output."""
    paths = {str(pathlib.Path.home()), tempfile.gettempdir(), sys.prefix, str(REPO)}
    return sorted((p for p in paths if p and p != "/"), key=len, reverse=True)


SECRET = re.compile(r"(api[_-]?key|secret|password|token)\s*[=:]\s*\S{8,}|gh[pousr]_[A-Za-z0-9]{20,}"
                    r"|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----", re.IGNORECASE)


def output_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return "\n".join(v for k, v in data.items() if k.startswith("text/") and isinstance(v, str))


def keep_output(output) -> bool:
    if output.get("output_type") == "stream" and output.get("name") == "stderr":
        return False
    text = output_text(output)
    return not any(path in text for path in machine_paths()) and not SECRET.search(text)


def clean(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if keep_output(o)]


def kernel_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return env


def prepare_datasets() -> None:
    from moejax.data.pipeline import load_builder

    for name in ("stdlib_text", "stdlib_text/small", "instruct_synth", "digits_images"):
        load_builder(name)


def render(name: str) -> float:
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=kernel_env())
    seconds = time.perf_counter() - start
    clean(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str]) -> None:
    names = argv or sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    prepare_datasets()
    for name in names:
        seconds = render(name)
        size = (NOTEBOOKS / f"{name}.ipynb").stat().st_size
        print(f"{name}: executed in {seconds:.0f} s, {size / 1024:.0f} KiB with outputs", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
