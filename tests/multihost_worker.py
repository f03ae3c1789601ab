"""One process of the two-process test: restore a checkpoint onto a mesh spanning both, run a forward.

Usage: python multihost_worker.py PROCESS_ID PORT CHECKPOINT IDS.npy OUT.npy
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

pid, port, ckpt, ids_file, out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4

from jax.experimental import multihost_utils  # noqa: E402

import internlm_jax as ij  # noqa: E402

mesh = ij.make_mesh(tensor=2, fsdp=4)  # spans both processes
model = ij.InternLM2.from_pretrained(ckpt, mesh=mesh, dtype="float32")  # f32: compare to rounding
wq = model.layers.attention.wq.get_value()
assert not wq.is_fully_addressable and len(wq.addressable_shards) == 4  # each process holds only its shards
logits = model(np.load(ids_file))
full = multihost_utils.process_allgather(logits, tiled=True)
if pid == 0:
    np.save(out_file, np.asarray(full))
multihost_utils.sync_global_devices("done")
print(f"process {pid} ok")
