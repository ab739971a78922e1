"""One process of a multi-process job (run by ``launch.local_multiprocess``) that checks that
every process restores the same checkpoint step, or all stop, when a fault hits one of them.

Usage: python tests/workers/checkpoint_agreement.py OUT_DIR [SCENARIO ...]

Every process saves steps 1, 2, 3 of a small sharded state into OUT_DIR/<scenario>, then:
  * corrupt: on process 1 only, step 3 reads as corrupt: all restore step 2, step 3 is moved aside;
  * transient: on process 1 only, step 3 fails with EIO every time: all raise
    TransientCheckpointError and nothing is moved;
  * read_error (only when asked for): on process 1 only, orbax's read of step 3 fails with EIO
    after every check that needs no decoding passed everywhere. Process 1 skips orbax's closing
    barrier, the votes pair up with it, and the job stops with "the processes fell out of step";
    nothing is moved (RELIABILITY.md);
  * healthy: all restore step 3.
Each process writes OUT_DIR/result_<process>.json.
"""

import errno
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from jdiff import parallel  # noqa: E402

parallel.initialize_distributed()

import flax.struct  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdiff.train import checkpoint  # noqa: E402
from jdiff.train.checkpoint import Checkpointer, TransientCheckpointError  # noqa: E402


@flax.struct.dataclass
class State:
    step: jax.Array
    w: jax.Array


def main(out: str, scenarios) -> None:
    me = jax.process_index()
    mesh = parallel.make_mesh()
    sharding = parallel.data_sharding(mesh)
    results = {"process": me, "process_count": jax.process_count(), "devices": jax.device_count()}

    def state(step):
        w = jax.make_array_from_callback((8, 3), sharding, lambda idx: np.arange(24, dtype=np.float32).reshape(8, 3)[idx] + step)
        return State(step=jax.device_put(jnp.asarray(step, jnp.int32), parallel.replicated(mesh)), w=w)

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
    real_verify, real_read = Checkpointer._verify, Checkpointer._restore_step
    for scenario in scenarios:
        workdir = os.path.join(out, scenario)
        ck = Checkpointer(workdir, keep=5, backoff=0.0, retries=2)
        for s in (1, 2, 3):
            ck.save(state(s))
        ck.wait()

        def verify(self, step, scenario=scenario):
            if me == 1 and step == 3 and scenario == "corrupt":
                return checkpoint._CORRUPT, "injected: process 1 reads step 3 as corrupt"
            if me == 1 and step == 3 and scenario == "transient":
                raise OSError(errno.EIO, "injected I/O error")
            return real_verify(self, step)

        def guarded(self, step, scenario=scenario):
            try:
                return verify(self, step)
            except OSError as e:  # what _verify does with its own OSErrors
                return checkpoint._TRANSIENT, f"{type(e).__name__}: {e}"

        def read(self, step, abstract, scenario=scenario):
            if me == 1 and step == 3 and scenario == "read_error":
                raise OSError(errno.EIO, "injected read error")
            return real_read(self, step, abstract)

        Checkpointer._verify, Checkpointer._restore_step = guarded, read
        reader = Checkpointer(workdir, keep=5, backoff=0.0, retries=2)
        try:
            restored = reader.restore(target)
            got = {"step": int(restored.step), "w_sum": float(jnp.sum(restored.w))}
        except TransientCheckpointError as e:
            got = {"error": type(e).__name__, "message": str(e)}
        Checkpointer._verify, Checkpointer._restore_step = real_verify, real_read
        got["steps_after"] = reader.steps()
        got["aside"] = sorted(os.listdir(os.path.join(workdir, "checkpoints.corrupt"))) \
            if os.path.isdir(os.path.join(workdir, "checkpoints.corrupt")) else []
        reader.close()
        ck.close()
        results[scenario] = got
    with open(os.path.join(out, f"result_{me}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ("healthy", "corrupt", "transient"))
