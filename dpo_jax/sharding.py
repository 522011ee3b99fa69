"""Device mesh, logical-name → mesh-axis rules, and host → global array placement.

The only module that knows about mesh axes. Parameters carry logical axis names
(`embed`, `vocab`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`, `norm`); the rules map
each name to a mesh axis (or None = replicated). The batch is split by rows over the
data-parallel axes (`data` × `fsdp`): FSDP shards parameters *and* data, like ZeRO-3.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Axes over which batch rows are split; tensor-parallel ranks see the same rows.
BATCH_AXES = ("data", "fsdp")

# FSDP by default: the embed dimension of every matrix is split over `fsdp`;
# Megatron-style tensor parallelism splits heads / mlp / vocab over `tensor`.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def mesh_rules(rules) -> tuple:
    """Rules as flax wants them, (name, axis | (axes…) | None); JSON made the tuples lists."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


class MeshError(ValueError):
    """A mesh or batch shape that cannot work on the available devices."""


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Replaces a single -1 by the remaining devices and checks the product."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    wildcards = [name for name, size in sizes.items() if size == -1]
    if len(wildcards) > 1:
        raise MeshError(f"config mesh: at most one of {wildcards} may be -1")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise MeshError(f"config mesh.{name}={size}: sizes are positive integers or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if wildcards:
        if num_devices % fixed:
            raise MeshError(
                f"config mesh {sizes}: {num_devices} devices are not divisible by {fixed}; "
                f"choose sizes whose product divides {num_devices}"
            )
        sizes[wildcards[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(
            f"config mesh {sizes} has {math.prod(sizes.values())} devices but "
            f"{num_devices} are available; set mesh sizes whose product is {num_devices} "
            "(or use -1 for one axis)"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (all processes)."""
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    # create_device_mesh orders devices so that the last axis (`tensor`) stays within the
    # fastest links (NVLink on a GPU host, ICI neighbours on TPU).
    device_grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(device_grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def logical_shardings(logical_specs, mesh: Mesh, rules: Rules):
    """Pytree of logical PartitionSpecs → pytree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, tuple(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, row_axis: int) -> NamedSharding:
    """Splits axis `row_axis` of an ndim array over the data-parallel axes."""
    spec = [None] * ndim
    spec[row_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def check_batch_rows(num_rows: int, mesh: Mesh, what: str) -> None:
    dp = data_parallel_size(mesh)
    if num_rows % dp:
        raise MeshError(
            f"{what}: {num_rows} rows per step are not divisible by the data-parallel size "
            f"{dp} (mesh data × fsdp); make the pair batch size a multiple of {max(dp // 2, 1)}"
        )


def check_rows_process_major(mesh: Mesh, num_rows: int, process_count: int | None = None) -> None:
    """Process p's rows must be the p-th contiguous block of the global rows. Prefix-shared
    batches rely on it: their extra_index points into the rows of all processes (the other
    arrays do not care where a process's rows land)."""
    process_count = process_count or jax.process_count()
    size = num_rows // process_count
    indices = batch_sharding(mesh, 2, 0).devices_indices_map((num_rows, 1))
    for device, (rows, _) in indices.items():
        start, stop, _ = rows.indices(num_rows)
        block = device.process_index
        if not block * size <= start < stop <= (block + 1) * size:
            raise MeshError(
                f"data.prefix_sharing: process {block}'s device {device.id} holds rows "
                f"{start}..{stop - 1}, outside its block {block * size}..{(block + 1) * size - 1}; "
                "order the mesh's devices by process (the default device order does)"
            )


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, row_axis: int) -> dict[str, jax.Array]:
    """This process's rows of a host batch → global jax.Arrays.

    Row-level arrays hold only the rows of this process's devices (processes in order, each
    an equal contiguous slice) and are split over the data-parallel axes; pair-level arrays
    (fewer dims) are whole on every process and replicated.
    """
    placed = {}
    for name, array in batch.items():
        if array.ndim > row_axis + 1:
            global_shape = list(array.shape)
            global_shape[row_axis] *= jax.process_count()
            placed[name] = jax.make_array_from_process_local_data(
                batch_sharding(mesh, array.ndim, row_axis), array, tuple(global_shape)
            )
        else:
            placed[name] = jax.make_array_from_callback(
                array.shape, replicated(mesh), lambda index, array=array: array[index]
            )
    return placed


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts JAX's multi-controller runtime when the launch has several processes.

    Explicit flags win (Kubernetes JobSets pass them from the pod's index, see
    launch/README.md); otherwise JAX's own detection handles SLURM (srun) and Open MPI
    (mpirun), or any launch that sets DPO_JAX_DISTRIBUTED=1. A plain single-process launch
    does nothing. Must run before any computation touches a device.
    """
    explicit = coordinator_address is not None and (num_processes or 1) > 1
    if explicit:
        # CPU devices need a collectives backend to talk across processes; GPUs and TPUs
        # ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif cluster_detected():
        jax.distributed.initialize()


def cluster_detected() -> bool:
    """A multi-process launch by SLURM (srun), Open MPI (mpirun), or one that asks for it."""
    env = os.environ
    if env.get("DPO_JAX_DISTRIBUTED") == "1":
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
