"""Save checkpoints until killed (tests/test_reliability.py kills it during saves).

Usage: python tests/workers/save_forever.py WORKDIR

Resumes from the newest step in WORKDIR (checking that its contents are what that step saved),
then saves step s+1, s+2, ... of a 16 MB state whose values are a function of the step,
printing "saving <s>" before each save starts and "saved <s>" once it is on disk.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import flax.struct  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdiff.train.checkpoint import Checkpointer  # noqa: E402

SIZE = 1 << 22  # float32 values: 16 MB


@flax.struct.dataclass
class State:
    step: jax.Array
    w: jax.Array


def values(step: int) -> np.ndarray:
    return np.arange(SIZE, dtype=np.float32) + np.float32(step)


def target() -> State:
    return State(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((SIZE,), jnp.float32))


def main(workdir: str) -> None:
    ck = Checkpointer(workdir, keep=3)
    restored = ck.restore(target())
    step = 0 if restored is None else int(restored.step)
    if restored is not None:
        np.testing.assert_array_equal(np.asarray(restored.w), values(step))
    print(f"resumed {step}", flush=True)
    while True:
        step += 1
        print(f"saving {step}", flush=True)
        ck.save(State(jnp.asarray(step, jnp.int32), jnp.asarray(values(step))))
        ck.wait()
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
