"""Device meshes, logical axis rules, and parameters and batches born on their shards.

The mesh has four axes, always in this order and always present (size 1 when unused):

* ``data``   — pure data parallelism: parameters replicated, the batch split.
* ``fsdp``   — data parallelism with parameters (their ``embed`` dimension) split too (ZeRO-3 style).
* ``expert`` — expert parallelism: expert weights split by expert; outside the experts it splits the
  batch like ``data``, so no device idles in the attention or dense layers.
* ``tensor`` — tensor parallelism: the ``mlp``, ``heads`` and ``vocab`` dimensions split.

Every mesh axis is ``AxisType.Auto``: shardings propagate through the compiler (GSPMD) from the
parameters, the batch and the few constraints the layers place, so model code needs no
``out_sharding=`` arguments. Code that must control the layout exactly (the expert-parallel
exchange) enters ``jax.shard_map``.

Model code names the dimensions of its parameters and activations with *logical* axes (``batch``,
``length``, ``embed``, ``mlp``, ``heads``, ``expert``, ``vocab``); a rule table maps each logical
name to mesh axes. :data:`DEFAULT_RULES` is the table used when none is given; a config may pass
its own (same format as ``flax.nnx.logical_axis_rules``: ``(logical, mesh axis | tuple | None)``
pairs).

Inside another model the host decides: its mesh (any axis names; ``Auto``, ``Explicit`` or mixed
axis types) and its active rules (Linen ``axis_rules`` / ``nnx.logical_axis_rules``) are used as
they are. One rule holds everywhere: a logical name the rules do not map is replicated (a hint,
never an error), and mesh axes the mesh lacks are dropped. :class:`MeshRoles` names the axes that
hold the experts, split the tokens and split F when the rules do not say.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("expert", "expert"),
    ("vocab", "tensor"),
)


class MeshRoles(NamedTuple):
    """Which mesh axes play which part in the MoE layer, for meshes whose axes moejax's rules do
    not name (e.g. ``('data', 'model')``): ``expert`` holds the experts (one axis), ``batch`` splits
    the tokens, ``hidden`` splits the experts' hidden dimension F. None: from the logical rules.
    """

    expert: str | None = None
    batch: tuple[str, ...] | None = None
    hidden: tuple[str, ...] | None = None


# --------------------------------------------------------------------------- mesh


def make_mesh(*, data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, **unknown_axes: int) -> Mesh:
    """A ``(data, fsdp, expert, tensor)`` mesh over ``devices`` (default: all devices of all processes).

    One axis may be ``-1``: it takes the devices the others leave. The product of the sizes must equal
    the number of devices. On a TPU slice the axes follow its physical torus; where no product of
    them matches a physical axis (fsdp=32, expert=8 on 16x16), a mesh axis may split one.
    """
    if unknown_axes:
        raise ValueError(
            f"make_mesh: unknown mesh axes {sorted(unknown_axes)}; the axes are {MESH_AXES}"
        )
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"make_mesh: axis {name!r} must be a positive int or -1, got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"make_mesh: axis {free[0]!r} = -1 takes the rest, but {len(devices)} devices are not "
                f"divisible by the other axes' product {fixed} ({_describe(sizes)})"
            )
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"make_mesh: {_describe(sizes)} needs {total} devices, but {len(devices)} are available"
        )
    shape = tuple(int(sizes[name]) for name in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # A TPU slice whose physical axes no product of mesh axes matches (fsdp=32, expert=8 on a
        # 16x16 torus): mesh axes may then split a physical axis (expert=8 within a row of 16).
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{name}={size}" for name, size in sizes.items())


# --------------------------------------------------------------------------- rules


def _check_rules(rules: Rules, mesh_axes: Sequence[str] | None = None) -> Rules:
    rules = tuple((str(name), axes) for name, axes in rules)
    for name, axes in rules:
        for axis in as_axes(axes):
            if mesh_axes is not None and axis not in mesh_axes:
                raise ValueError(
                    f"logical axis rule {name!r} -> {axes!r} names mesh axis {axis!r}, which is not "
                    f"one of the mesh's axes {tuple(mesh_axes)}"
                )
    return rules


def as_axes(axes) -> tuple[str, ...]:
    """A rule's right-hand side (None, one mesh axis or several) as a tuple of mesh axes."""
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def current_rules() -> Rules:
    """The rules set by the innermost :func:`use_mesh` (``DEFAULT_RULES`` outside any)."""
    return tuple(flax_spmd.get_logical_axis_rules()) or DEFAULT_RULES


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None,
                    mesh=None) -> PartitionSpec:
    """The ``PartitionSpec`` for an array whose dimensions have logical ``names`` (None: replicated).

    The rule is a hint, never an error: a name the rules do not map is replicated, and with a
    ``mesh`` the mesh axes it lacks are dropped. A mesh axis already used by an earlier dimension is
    not used again (``[batch, length, embed]`` splits ``batch`` over ``fsdp`` and leaves ``embed``
    whole).
    """
    table = dict(_check_rules(current_rules() if rules is None else rules))
    present = None if mesh is None else set(mesh.axis_names)
    used: set[str] = set()
    spec = []
    for name in names:
        axes = tuple(a for a in as_axes(table.get(name)) if a not in used
                     and (present is None or a in present)) if name is not None else ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def rules_for(mesh, rules: Rules | None = None) -> Rules:
    """``rules`` (default: the active rules, or :data:`DEFAULT_RULES`) with the mesh axes ``mesh``
    lacks dropped, so moejax's defaults fit a host's mesh of any axis names."""
    rules = current_rules() if rules is None else _check_rules(rules)
    return tuple((name, tuple(a for a in as_axes(axes) if a in mesh.axis_names) or None)
                 for name, axes in rules)


def fallback_rules(roles: MeshRoles | None = None) -> Rules | None:
    """Rules a layer built under a host's mesh stores on its parameters (``sharding_rules``), so
    Flax's own recipe (``nnx.get_partition_spec`` + ``with_sharding_constraint``) works there.

    Only for moejax's logical names the active rules do not map (Flax joins the two tables and
    refuses a name mapped twice): the axes ``roles`` name, else moejax's default axes the mesh has,
    else None (replicated). None when no mesh is active or the active rules map every name.
    """
    mesh = active_mesh()
    if mesh is None:
        return None
    roles = MeshRoles() if roles is None else roles
    host = dict(flax_spmd.get_logical_axis_rules())
    defaults = dict(DEFAULT_RULES)
    by_role = {"expert": (roles.expert,) if roles.expert else None, "mlp": roles.hidden,
               "batch": roles.batch}
    # One parameter names expert, embed and mlp together, and a mesh axis may split only one of
    # its dimensions: the expert axis first, then mlp, then embed.
    taken: set[str] = set()
    fallback = []
    for name in ("expert", "mlp", "embed", "batch", "length", "heads", "vocab"):
        wanted = host[name] if name in host else by_role.get(name) or defaults.get(name)
        axes = tuple(a for a in as_axes(wanted) if a in mesh.axis_names and (name == "batch" or a not in taken))
        if name in ("expert", "mlp"):
            taken.update(axes)
        if name not in host:
            fallback.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(fallback) or None


def has_explicit_axes(mesh) -> bool:
    """Whether any axis of ``mesh`` is ``Explicit`` (sharding in types: the host's arrays carry it)."""
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _axes_size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in as_axes(axes))


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh, what: str) -> None:
    """A ValueError naming ``what``, the dimension and the mesh axes if ``spec`` does not tile ``shape``."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        parts = _axes_size(mesh, axes)
        if size % parts:
            sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in as_axes(axes))
            raise ValueError(
                f"{what}: dimension {dim} of size {size} is split over mesh axes {as_axes(axes)} "
                f"of total size {parts} ({sizes}), which does not divide it"
            )


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Makes ``mesh`` the current mesh (``jax.set_mesh``) and ``rules`` the logical axis rules.

    Inside, ``moejax.MoE`` runs its dropless and capacity dispatch per device under ``shard_map``
    (experts split when the ``expert`` axis has size > 1), and :func:`constrain` places its
    constraints.
    """
    rules = rules_for(mesh, DEFAULT_RULES) if rules is None else _check_rules(rules, mesh.axis_names)
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
        yield mesh


def active_mesh():
    """The mesh set by :func:`use_mesh` / ``jax.set_mesh`` (an abstract mesh inside jit), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names under the current mesh; ``x`` as is without one.

    A hint, never an error: mesh axes the current mesh lacks are skipped, and a dimension they do
    not divide is left to the compiler (``PartitionSpec.UNCONSTRAINED``). Under a mesh with
    ``Explicit`` axes the arrays' types carry the host's sharding, and ``x`` is returned as is.
    """
    mesh = active_mesh()
    if mesh is None or has_explicit_axes(mesh):
        return x
    dims = []
    for size, axes in zip(x.shape, logical_to_spec(names, mesh=mesh)):
        axes = as_axes(axes)
        dims.append(axes or None if size % _axes_size(mesh, axes) == 0
                    else PartitionSpec.UNCONSTRAINED)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*dims)))


def replicated(x: jax.Array) -> jax.Array:
    """``x`` whole on every device when its type carries a split over ``Explicit`` axes (a
    reshard); ``x`` as is otherwise (``Auto`` axes leave the layout to the compiler)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(s is None for s in spec) or not has_explicit_axes(sharding.mesh):
        return x
    return jax.sharding.reshard(x, PartitionSpec())


def like(y: jax.Array, x: jax.Array) -> jax.Array:
    """``y`` resharded to ``x``'s sharding when ``x``'s type carries one over ``Explicit`` axes (the
    layer's output keeps its input's layout); ``y`` as is otherwise."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if (sharding is None or not has_explicit_axes(sharding.mesh) or y.shape != x.shape
            or getattr(jax.typeof(y), "sharding", None) == sharding):
        return y
    return jax.sharding.reshard(y, sharding.spec)


# --------------------------------------------------------------------------- parameters


def _variable_spec(variable: nnx.Variable, rules: Rules, mesh) -> PartitionSpec:
    names = variable.get_metadata().get("out_sharding")
    if not names:
        return PartitionSpec()
    return logical_to_spec(names, rules, mesh)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """``NamedSharding`` for every leaf of an ``nnx.State``, from the variables' ``out_sharding`` names.

    Raises a ValueError naming the parameter when the mesh axes do not divide one of its dimensions.
    """
    rules = rules_for(mesh, DEFAULT_RULES) if rules is None else _check_rules(rules, mesh.axis_names)

    def one(path, variable):
        spec = _variable_spec(variable, rules, mesh)
        name = ".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        value = variable.get_value()
        check_divisible(value.shape, spec, mesh, f"parameter {name} {tuple(value.shape)}")
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map_with_path(one, abstract_state,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh,
                   rules: Rules | None = None) -> nnx.Module:
    """Builds ``factory()`` with every parameter created directly on its shards.

    ``factory`` is e.g. ``lambda: moejax.MoE(config, rngs=nnx.Rngs(0))``. Shapes come from
    ``nnx.eval_shape``; the initialisation runs in one ``jax.jit`` whose ``out_shardings`` are read
    from each parameter's logical axes and ``rules``, so no device ever holds a full copy of a split
    parameter. The values are those of ``factory()`` run eagerly on one device (up to float
    rounding: the jitted initialiser fuses its ops).
    """
    rules = rules_for(mesh, DEFAULT_RULES) if rules is None else _check_rules(rules, mesh.axis_names)
    with use_mesh(mesh, rules):
        abstract = nnx.eval_shape(factory)
        graphdef, abstract_state = nnx.split(abstract)
        shardings = state_shardings(abstract_state, mesh, rules)

        def init():
            return nnx.split(factory())[1]

        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------- batches


def batch_spec(rules: Rules | None = None) -> PartitionSpec:
    """``PartitionSpec`` of a batch: the leading dimension split like logical ``batch``."""
    return logical_to_spec(("batch",), rules)


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """Sharding of a batch array: leading dimension over the ``batch`` rule's axes, the rest whole."""
    rules = rules_for(mesh, DEFAULT_RULES) if rules is None else _check_rules(rules, mesh.axis_names)
    return NamedSharding(mesh, batch_spec(rules))


def shard_batch(batch: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Places a pytree of host arrays on ``mesh``, the leading (batch) dimension split.

    In one process ``batch`` is the whole batch. With several, each process passes the rows its own
    devices hold (``batch_sharding(mesh).addressable_devices_indices_map(global_shape)`` says which;
    with the default device order, process ``i`` holds the ``i``-th block), and the global batch
    has ``process_count()`` times as many rows. Raises a ValueError when the global batch size is
    not divisible by the batch axes.
    """
    sharding = batch_sharding(mesh, rules)
    axes = as_axes(sharding.spec[0])
    parts = _axes_size(mesh, axes)
    processes = jax.process_count()

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"shard_batch: leaf {jax.tree_util.keystr(path)} is a scalar; "
                             "batch arrays need a leading batch dimension")
        global_rows = x.shape[0] * processes
        if global_rows % parts:
            raise ValueError(
                f"shard_batch: batch size {global_rows} of leaf {jax.tree_util.keystr(path)} is not "
                f"divisible by the batch mesh axes {axes} of total size {parts} "
                f"({', '.join(f'{a}={mesh.shape[a]}' for a in axes)})"
            )
        return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

    return jax.tree.map_with_path(one, batch)
