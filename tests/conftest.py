"""Test setup: 8 fake CPU devices, strict rank and dtype promotion, before anything imports jax."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several pytest workers compile for TPU ahead of time; libtpu otherwise lets one process load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent compilation cache for every test process (pytest-xdist workers and the trainer's
# subprocesses): programs compiled once (a smoke model's train step, a layer's VJP) are loaded, not
# compiled again, by the next test that builds them. Keyed by the program, the compile options and
# the jaxlib version, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"moejax-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


settings.register_profile(
    "moejax",
    deadline=None,
    max_examples=int(os.environ.get("MOEJAX_HYPOTHESIS_EXAMPLES", "20")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("CI") == "true",
)
settings.load_profile("moejax")


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
    """Every test runs under JAX's strictest dtype promotion (its own test configuration: a bf16 * f32
    in library code raises) unless marked ``dtype_promotion("standard")`` — for the trainer, whose
    optimiser (optax) relies on implicit promotion."""
    marker = request.node.get_closest_marker("dtype_promotion")
    with jax.numpy_dtype_promotion(marker.args[0] if marker else "strict"):
        yield


@pytest.fixture
def single_device():
    """For tests that must not see the 8 fake devices: the first CPU device, used explicitly."""
    device = jax.devices("cpu")[0]
    with jax.default_device(device):
        yield device
