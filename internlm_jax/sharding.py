"""Device meshes and the one table that maps logical array axes to mesh axes.

Every parameter and activation names its axes logically (``"embed"``, ``"q_heads"``, ``"batch"`` ...);
:data:`LOGICAL_RULES` says which mesh axes each logical axis may be split over. A dimension that a
mesh axis does not divide is not split over that axis (it is replicated along it) rather than
failing: this is how ``tensor`` larger than ``num_key_value_heads`` works (each KV head is held by
every device of the tensor group that needs it) and how odd vocabularies or batch sizes still run.
:func:`explain_sharding` lists every such decision.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical axis -> mesh axes it is split over, in order of preference.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vector": (),  # norm weights and output biases: small, replicated
    # activations
    "batch": ("data", "fsdp"),
    "seq": ("sequence",),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_seq": ("sequence",),
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor, sequence)`` over ``devices`` (default: all).

    One size may be -1 to take the devices left over (by default ``fsdp``). Axis types are Auto, so
    XLA propagates shardings from the parameters and the constraints the model places.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "sequence": sequence}
    free = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"mesh axis {k!r} must be a positive integer or -1, got {v!r}")
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} device(s) cannot be split into mesh {sizes}: the fixed axes "
                             f"multiply to {fixed}, which does not divide {len(devices)}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        if total < len(devices) and not free:
            available, devices = len(devices), devices[:total]  # explicitly asked for a smaller mesh
            left_out = {d.process_index for d in jax.devices()} - {d.process_index for d in devices}
            if left_out:  # those processes would hold no part of the arrays and fail far from here
                raise ValueError(f"mesh {sizes} uses {total} of the {available} devices, leaving out processes "
                                 f"{sorted(left_out)}: on {jax.process_count()} processes the mesh must span "
                                 f"all {jax.device_count()} devices (use -1 for one axis)")
        else:
            hint = ""
            if jax.default_backend() == "cpu":  # simulated CPU devices must be asked for before jax starts
                hint = (f" (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={total} before JAX starts, "
                        f"or the CLI's --devices {total})")
            raise ValueError(f"mesh {sizes} needs {total} devices but {len(devices)} are available{hint}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)


def logical_to_spec(axes: Iterable[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, tuple[str, ...]] = LOGICAL_RULES, *,
                    notes: list[str] | None = None, what: str = "array") -> PartitionSpec:
    """PartitionSpec for an array whose dims are named ``axes``; skips mesh axes that don't divide."""
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"{what}: {len(axes)} logical axes {axes} for a {len(shape)}-d shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"{what}: logical axis {name!r} has no rule in the sharding table")
        chosen = []
        for mesh_axis in rules.get(name, ()) if name else ():
            n = mesh.shape[mesh_axis]
            if n == 1 or mesh_axis in used:
                continue
            split = math.prod(mesh.shape[a] for a in chosen) * n
            if size % split:
                if notes is not None:
                    notes.append(f"{what}: dim {name!r} of size {size} is not divisible by mesh axis "
                                 f"{mesh_axis!r} (x{n}), so it is replicated along {mesh_axis!r}")
                continue
            chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh: Mesh, **kw) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, **kw))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Pin an activation's sharding by logical axis names (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh))


def explain_sharding(model) -> dict[str, str]:
    """Parameter path -> ``PartitionSpec`` string, plus the replication notes, for reading by humans."""
    from .arrays import flat_params

    out = {}
    for name, var in flat_params(model).items():
        notes: list[str] = []
        spec = logical_to_spec(var.logical_axes, var.get_value().shape, model.mesh, notes=notes, what=name) \
            if model.mesh is not None else PartitionSpec()
        out[name] = str(spec) + ("" if not notes else "  # " + "; ".join(notes))
    return out
