"""The Pallas TPU gmm/tgmm kernels through the real TPU compiler, for every TPU generation.

Interpret mode checks the numbers and ``jax.export`` checks that Mosaic lowers the kernels; this file
runs the next rung: libtpu's compiler, ahead of time on this CPU host, for one-chip programs on v4,
v5e, v5p and v6e slices (``jax.experimental.topologies``). It is what rejects VMEM overflows and
layouts the chip cannot hold. Each program holds gmm (plain and transposed rhs) and tgmm with their
custom VJPs, on shapes whose last tiles are partial in every dimension, with a traced
``group_offset`` (the rhs holds a slice of the groups, as under expert parallelism).

Also the train step of the sharded dropless MoE layer, for the ops whose generated code grows with
the number of tokens per device (so that full-size configs stop compiling in minutes).
"""

from __future__ import annotations

import functools

# libtpu takes a lock per machine; test workers compiling at once must share it.

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import parallel
from moejax.ops import gmm, tgmm


@pytest.fixture(autouse=True)
def _no_persistent_cache():
    """Programs compiled for a topology without its chips cannot be read back from the persistent
    compilation cache (tests/conftest.py): none are written."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)

# The smallest slice of each generation; the programs run on its first chip.
CHIPS = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
# Non-default tilings (tm, tk, tn) and the chip each is compiled for: the smallest row tile bf16
# packs (16 rows) with a wide output tile, and large square tiles on the chip with the least VMEM.
OTHER_TILINGS = {(16, 128, 256): "v5e", (256, 256, 256): "v4"}
NUM_GROUPS, LOCAL_GROUPS = 8, 4


@functools.cache
def _topology(chip):
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=CHIPS[chip])
    except Exception as error:  # libtpu is missing on this machine
        pytest.skip(f"no TPU compiler: {error}")


def _one_chip(chip):
    mesh = jax.sharding.Mesh(np.array(_topology(chip).devices[:1]), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _structs(chip, dtype, m, k, n):
    sharding = _one_chip(chip)

    def struct(shape, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    return dict(
        lhs=struct((m, k)), rhs=struct((LOCAL_GROUPS, k, n)), rhs_t=struct((LOCAL_GROUPS, n, k)),
        dout=struct((m, n)), dw=struct((LOCAL_GROUPS, k, n)),
        group_sizes=struct((NUM_GROUPS,), jnp.int32), offset=struct((), jnp.int32))


def _kernels_and_vjps(tiling, lhs, rhs, rhs_t, dout, dw, group_sizes, offset):
    """gmm, gmm with transposed rhs and tgmm, each with its VJP: 9 Pallas kernels in all."""
    kw = dict(group_offset=offset, tiling=tiling, backend="pallas_tpu", interpret=False)
    out, vjp = jax.vjp(lambda x, w: gmm(x, w, group_sizes, **kw), lhs, rhs)
    out_t, vjp_t = jax.vjp(lambda x, w: gmm(x, w, group_sizes, transpose_rhs=True, **kw),
                           lhs, rhs_t)
    w, vjp_w = jax.vjp(lambda x, y: tgmm(x, y, group_sizes, num_groups=LOCAL_GROUPS, **kw),
                       lhs, dout)
    return out, vjp(dout), out_t, vjp_t(dout), w, vjp_w(dw)


def _compile(chip, dtype, tiling, m, k, n):
    structs = _structs(chip, dtype, m, k, n)
    return jax.jit(functools.partial(_kernels_and_vjps, tiling)).lower(**structs).compile()


def _kernel_calls(compiled) -> int:
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


# m = 300 rows: the last row tile is partial; k = 200 and n = 320 leave partial k and n tiles too.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chip", CHIPS)
def test_gmm_tgmm_and_their_vjps_compile_for_every_chip_at_the_default_tiling(chip, dtype):
    compiled = _compile(chip, DTYPES[dtype], None, m=300, k=200, n=320)
    assert _kernel_calls(compiled) == 9
    memory = compiled.memory_analysis()
    assert memory.output_size_in_bytes > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiling", OTHER_TILINGS)
def test_gmm_tgmm_and_their_vjps_compile_at_other_tilings(tiling, dtype):
    # 600 x 400 x 320: partial last tiles in m, k and n for each of these tilings.
    compiled = _compile(OTHER_TILINGS[tiling], DTYPES[dtype], tiling, m=600, k=400, n=320)
    assert _kernel_calls(compiled) == 9


def _compile_gmm(chip, dtype, tiling, m, k, n):
    s = _structs(chip, dtype, m, k, n)
    sizes = jax.ShapeDtypeStruct((LOCAL_GROUPS,), jnp.int32, sharding=_one_chip(chip))
    fn = jax.jit(lambda x, w, g: gmm(x, w, g, tiling=tiling, backend="pallas_tpu", interpret=False))
    return fn.lower(s["lhs"], s["rhs"], sizes).compile()


def test_tiles_beyond_the_default_scoped_vmem_raise_the_kernels_vmem_limit():
    """(8, 1536, 1536) in f32 double-buffers about 19 MiB of tiles, past Mosaic's default 16 MiB
    scoped limit on v5e ("Scoped allocation with size 18.00M and limit 16.00M exceeded" before the
    kernels raised it); v5e has 128 MiB of VMEM."""
    from moejax.kernels import pallas_tpu

    need = pallas_tpu.vmem_bytes(
        [((8, 1536), jnp.float32), ((1536, 1536), jnp.float32), ((8, 1536), jnp.float32)],
        [((8, 1536), jnp.float32)])
    assert need > 16 * 2**20
    compiled = _compile_gmm("v5e", jnp.float32, (8, 1536, 1536), 64, 1536, 1536)
    assert _kernel_calls(compiled) == 1


def test_tiles_beyond_the_chips_vmem_are_rejected_by_the_tpu_compiler():
    """v4 has 16 MiB of VMEM: (512, 1024, 1024) in f32 needs about 22 MiB. Interpret mode and
    jax.export accept it; only the TPU compiler says no."""
    with pytest.raises(Exception, match="(?i)vmem"):
        _compile_gmm("v4", jnp.float32, (512, 1024, 1024), 600, 1024, 1024)


@pytest.mark.parametrize("chip", ["v5e", "v5p"])
def test_lax_ragged_dot_and_its_gradient_compile_for_tpu(chip):
    """The baseline a Pallas kernel must beat on TPU: XLA's own grouped matmul (a native ragged
    dot with a tile-metadata custom call), not the masked dense expansion the CPU gets."""
    s = _structs(chip, jnp.bfloat16, m=300, k=200, n=320)
    sizes = jax.ShapeDtypeStruct((LOCAL_GROUPS,), jnp.int32, sharding=_one_chip(chip))

    def loss(x, w, g):
        y = jax.lax.ragged_dot(x, w, g).astype(jnp.float32)
        return jnp.sum(y * jnp.cos(y))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
        s["lhs"], s["rhs"], sizes).compile()
    assert "ragged" in compiled.as_text()


def _layer_step_hlo(dispatch, sharded=True):
    """The optimized TPU HLO of the layer's gradient step on v5e: expert-parallel over a 2x2 slice
    (expert=4), or (``sharded=False``) on one chip, where dropless runs ``moejax.ops.dropless``."""
    import contextlib

    from flax import nnx

    mesh = parallel.make_mesh(expert=4, devices=_topology("v5e").devices) if sharded else None
    config = moejax.MoEConfig(d_model=128, d_ff=256, num_experts=8, experts_per_token=2,
                              router="mixtral", expert="glu", activation="silu",
                              dispatch=dispatch, gmm_backend="pallas_tpu", gmm_interpret=False,
                              dtype=jnp.bfloat16)
    in_mesh = (lambda: parallel.use_mesh(mesh)) if sharded else contextlib.nullcontext
    with in_mesh():
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: moejax.MoE(config, rngs=nnx.Rngs(0))))
        shardings = (parallel.state_shardings(abstract, mesh) if sharded
                     else jax.tree.map(lambda _: _one_chip("v5e"), abstract))
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                         abstract, shardings)
    x = jax.ShapeDtypeStruct((4, 64, 128), jnp.bfloat16, sharding=parallel.batch_sharding(mesh)
                             if sharded else _one_chip("v5e"))

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux.total_loss

    with in_mesh():
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile().as_text()
    return [line for line in text.splitlines() if " = " in line]


def _row_scatters(instructions):
    # A row scatter updates windows (whole rows); the router's gate gradient scatters elements.
    return [line for line in instructions
            if " scatter(" in line and "update_window_dims={}" not in line]


def test_the_sharded_capacity_step_moves_rows_without_scatters():
    """Capacity dispatch fills its [E, C, D] buffer and combines from it by gathers whose backward
    passes are gathers too (autodiff of a gather scatter-adds rows, which the TPU compiler emits as
    code growing with the number of rows)."""
    instructions = _layer_step_hlo("capacity")
    assert any(" all-to-all(" in line for line in instructions)
    row_scatters = _row_scatters(instructions)
    assert not row_scatters, row_scatters[0][:200]


def test_the_sharded_dropless_step_has_one_sort_and_no_row_scatter():
    """The TPU compiler emits a sort, and a scatter-add of rows (autodiff of a gather with repeated
    indices: it sorts the indices first), as code that grows with the number of rows: at 8K tokens
    per device each such op took 2-8 s to compile and 1-3 MB of code. The expert-parallel dropless
    step sorts only the local copies once (the receiver's order follows from the counts) and moves
    rows only by gathers, forward and backward."""
    instructions = _layer_step_hlo("dropless")
    sorts = [line for line in instructions if " sort(" in line and "top_k" not in line]
    assert len(sorts) == 1 and "sort_copies" in sorts[0]
    row_scatters = _row_scatters(instructions)
    assert not row_scatters, row_scatters[0][:200]


def test_the_one_chip_dropless_step_compiles_with_the_pallas_kernels_and_no_row_scatter():
    """On one chip the dropless layer is ``moejax.ops.dropless``' custom VJP: compiled by the TPU
    compiler in bf16, every gmm and tgmm of the GLU experts is a Pallas kernel (three forward,
    three transposed, three weight gradients), the copies are sorted once, and rows move only by
    gathers, forward and backward."""
    instructions = _layer_step_hlo("dropless", sharded=False)
    kernels = [line for line in instructions if 'custom_call_target="tpu_custom_call"' in line]
    assert len(kernels) >= 9
    sorts = [line for line in instructions if " sort(" in line and "top_k" not in line]
    assert len(sorts) == 1 and "sort_copies" in sorts[0]
    row_scatters = _row_scatters(instructions)
    assert not row_scatters, row_scatters[0][:200]
