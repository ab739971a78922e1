"""jdiff.parallel: the same samples, params and checkpoints on 1, 2, 4 and 8 devices and on
2 processes x 2 devices (jax.distributed + gloo on localhost).

The pytest process has JAX initialised with one CPU device, so the multi-device runs happen
in subprocesses started once per module (XLA_FLAGS=--xla_force_host_platform_device_count
must be set before JAX starts):
  * a worker with 8 devices (this file run as a script) trains the tiny config on a 1-device
    mesh (the reference) and on 8 devices with FSDP, samples on 1, 2, 4 and 8 devices,
    restores the reference checkpoint onto 4 devices, records the batch-size errors, and
    meanwhile runs ``python -m launch.sample`` with 8 devices on the reference workdir;
  * ``python -m launch.local_multiprocess`` runs ``python -m launch.train`` as 2 processes x
    2 devices, at the same time as the worker.
The tests then compare what they wrote.

Why float32 results agree to ~1e-7 and not bit for bit: a sum over the batch (the gradient,
a GroupNorm's statistics) split over devices is summed in a different order (per-device
partial sums, then an all-reduce), and XLA:CPU's kernels tile by the per-device shape, so
float32 rounding differs in the last bit. Training sees it through Adam (see tiny_config),
sampling through the first DDIM step (see test_launch_sample_same_array_on_8_devices_as_on_1).
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402
from jdiff import data as data_lib  # noqa: E402
from jdiff import parallel  # noqa: E402
from jdiff.train import loop, network  # noqa: E402
from jdiff.train.checkpoint import Checkpointer  # noqa: E402
from jdiff.train.state import create_train_state, make_optimizer  # noqa: E402
from launch import local_multiprocess  # noqa: E402

FSDP_MIN_SIZE = 256  # small enough that the tiny U-Net's kernels are split
SAMPLE_ARGS = {"num": 30, "label": 3, "guidance": 1.0, "seed": 1}  # 30 rows: padded to 32 on 4 and 8 devices
ADAM_EPS = 1e-3  # see tiny_config
TIMEOUT = 900


def tiny_config():
    """configs/tiny.py without the grid at the end (``sample.num = 0``: the worker's runs are
    compared by their checkpoints, and sample through ``generate`` below), and Adam's eps raised
    from 1e-8 to 1e-3.

    Adam's update m / (sqrt(v) + eps) normalises each gradient element. Where an element's
    gradient is a near-cancelling sum over the batch, its float32 rounding, which depends on
    the summation order and so on the device split, is normalised to O(lr) as well: with
    eps = 1e-8 a few of the 45k params (2 above 5e-7 after 6 steps, max ~1.1e-6) differ between
    1 and 8 devices while Adam's moments, the gradients' history, agree to 1.5e-8. eps = 1e-3
    (above those elements' |g|) keeps the update linear in such gradients, so the params
    comparison measures the parallel computation, not Adam's conditioning.
    """
    c = tiny.get_config()
    c.sample.num = 0
    c.optim.eps = ADAM_EPS
    return c


def state_template(mesh, fsdp=False):
    """Abstract TrainState of the tiny config with the shardings of ``mesh``."""
    c = tiny_config()
    ds = data_lib.get_dataset(c.data)
    model = network.build_model(c)
    abstract = jax.eval_shape(
        lambda: create_train_state(network.init_params(model, ds.image_shape, jax.random.key(0)), make_optimizer(c.optim),
                                   jax.random.key(0))
    )
    shardings = parallel.param_shardings(abstract, mesh, fsdp, min_size=FSDP_MIN_SIZE)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def restore_host(workdir, mesh, fsdp=False):
    """The newest checkpoint of ``workdir`` restored onto ``mesh``, as NumPy leaves."""
    ck = Checkpointer(workdir)
    state = ck.restore(state_template(mesh, fsdp))
    ck.close()
    return state, [parallel.to_host(x) for x in jax.tree.leaves(state)]


# ---------------------------------------------------------------------------
# The 8-device worker (run as ``python tests/test_parallel.py OUT_DIR``).
# ---------------------------------------------------------------------------


def _worker(out):
    import jax.numpy as jnp

    from jdiff import samplers
    from jdiff.inference import generate, model_fn_for
    from jdiff.workdir import load_for_sampling

    assert jax.device_count() == 8, jax.devices()
    t0 = time.perf_counter()

    def done(what):
        print(f"[worker {time.perf_counter() - t0:6.1f} s] {what}", flush=True)

    results = {"threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}
    ref, fsdp8 = os.path.join(out, "ref"), os.path.join(out, "fsdp8")
    loop.train_and_evaluate(tiny_config(), ref, mesh=parallel.make_mesh(1))
    done("trained on 1 device")
    with open(os.path.join(out, "sample.log"), "w") as log:  # runs while this process goes on
        cli = subprocess.Popen(
            [sys.executable, "-m", "launch.sample", "--workdir", ref, "--num", str(SAMPLE_ARGS["num"]),
             "--label", str(SAMPLE_ARGS["label"]), "--guidance", str(SAMPLE_ARGS["guidance"]),
             "--seed", str(SAMPLE_ARGS["seed"]), "--out", os.path.join(out, "samples_cli_8.npz")],
            cwd=ROOT, env=_env(8), stdout=log, stderr=subprocess.STDOUT,
        )
    loop.train_and_evaluate(tiny_config(), fsdp8, mesh=parallel.make_mesh(8), fsdp=True, fsdp_min_size=FSDP_MIN_SIZE)
    done("trained on 8 devices (FSDP)")
    _, leaves = restore_host(fsdp8, parallel.make_mesh(8), fsdp=True)
    np.savez(os.path.join(out, "fsdp8_state.npz"), *leaves)
    md = ocp.StandardCheckpointer().metadata(os.path.join(fsdp8, "checkpoints", "6", "default"))
    results["fsdp8_saved_specs"] = [str(m.sharding.partition_spec) for m in jax.tree.leaves(getattr(md, "item_metadata", md))]

    # 1 -> 4 devices, onto FSDP shardings.
    state, leaves = restore_host(ref, parallel.make_mesh(4), fsdp=True)
    np.savez(os.path.join(out, "ref_on_4.npz"), *leaves)
    results["ref_on_4"] = [
        {"spec": str(x.sharding.spec), "devices": len(x.sharding.device_set), "shards": len({str(s.index) for s in x.addressable_shards})}
        for x in jax.tree.leaves(state)
    ]

    # 8 devices (FSDP) -> a 4x2 mesh: params split over its data axis of 4, replicated over
    # the second axis of 2.
    mesh42 = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), (parallel.DATA_AXIS, "model"))
    state, leaves = restore_host(fsdp8, mesh42, fsdp=True)
    np.savez(os.path.join(out, "fsdp8_on_4x2.npz"), *leaves)
    results["fsdp8_on_4x2"] = [{"spec": str(x.sharding.spec), "devices": len(x.sharding.device_set),
                                "shards": len({str(s.index) for s in x.addressable_shards})} for x in jax.tree.leaves(state)]
    done("restored the 8-device checkpoint on 1, 4 and 4x2 devices")

    # Sampling. float32, as users run it: 1 device here, 8 devices through launch.sample.
    a = SAMPLE_ARGS

    def sample(loaded, n, model):
        s, cfg = loaded.config.sample, loaded.config
        return generate(
            model, loaded.params, loaded.schedule, loaded.image_shape, a["num"], jax.random.key(a["seed"]),
            labels=np.full((a["num"],), a["label"], np.int32), guidance_weight=a["guidance"], batch_size=s.batch_size,
            method=s.method, steps=s.steps, eta=s.eta, clip=s.clip or None, variance=cfg.diffusion.variance,
            parameterization=cfg.diffusion.parameterization, mesh=parallel.make_mesh(n),
        )

    loaded = load_for_sampling(ref, parallel.make_mesh(1))
    np.save(os.path.join(out, "samples_f32_1.npy"), sample(loaded, 1, loaded.model))
    s = loaded.config.sample
    fn = model_fn_for(loaded.model, loaded.params, jnp.full((a["num"],), a["label"], jnp.int32), a["guidance"])
    direct = samplers.sample(fn, loaded.schedule, (a["num"],) + loaded.image_shape,
                             jax.random.fold_in(jax.random.key(a["seed"]), 0), method=s.method, steps=s.steps, eta=s.eta,
                             clip=s.clip or None)
    np.save(os.path.join(out, "samples_direct.npy"), np.asarray(direct))
    done("sampled in float32 on 1 device, with generate and with jdiff.sample")

    # The network in float64 (its output is still cast to float32), so that float32 rounding,
    # which XLA's shape-dependent kernels make differ between per-device batch sizes, does not
    # hide what is tested: the same key draws the same numbers for the same rows on any mesh.
    jax.config.update("jax_enable_x64", True)
    output_specs = []
    real_sample = samplers.sample

    def spy(*args, **kwargs):
        x = real_sample(*args, **kwargs)
        output_specs.append(str(x.sharding.spec) if len(x.sharding.device_set) > 1 else "one device")
        return x

    samplers.sample = spy
    for n in (1, 2, 4, 8):
        loaded = load_for_sampling(ref, parallel.make_mesh(n))
        x = sample(loaded, n, loaded.model.clone(dtype=jnp.float64))
        assert x.dtype == np.float64, x.dtype
        np.save(os.path.join(out, f"samples_f64_{n}.npy"), x)
        done(f"sampled in float64 on {n} devices")
    samplers.sample = real_sample
    jax.config.update("jax_enable_x64", False)
    results["sample_output_specs"] = output_specs

    # Batch sizes that do not split over the 8 devices.
    errors = {}
    bad = tiny_config()
    bad.data.batch_size = 12
    try:
        loop.train_and_evaluate(bad, os.path.join(out, "bad"), mesh=parallel.make_mesh(8))
    except ValueError as e:
        errors["train"] = str(e)
    errors["train_workdir_created"] = os.path.exists(os.path.join(out, "bad"))
    try:
        parallel.global_batch({"image": np.zeros((12, 8, 8, 1), np.float32)}, parallel.make_mesh(8))
    except ValueError as e:
        errors["global_batch"] = str(e)
    results["errors"] = errors
    batch = parallel.global_batch({"image": np.arange(16, dtype=np.float32)}, parallel.make_mesh(8))["image"]
    results["global_batch"] = {"spec": str(batch.sharding.spec), "values": np.asarray(batch).tolist(),
                               "shard_rows": sorted(np.asarray(s.data).tolist() for s in batch.addressable_shards)}
    results["fsdp_rule"] = {
        str(shape): str(parallel.param_shardings(jax.ShapeDtypeStruct(shape, np.float32), parallel.make_mesh(8), True,
                                                 min_size=FSDP_MIN_SIZE).spec)
        for shape in [(3, 3, 16, 32), (3, 3, 32, 16), (24, 40), (16,), (4, 4, 4, 3), (10, 30)]
    }
    if cli.wait(timeout=TIMEOUT) != 0:
        with open(os.path.join(out, "sample.log")) as f:
            raise RuntimeError(f"launch.sample on 8 devices failed:\n{f.read()[-4000:]}")
    done("launch.sample on 8 devices finished")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


# ---------------------------------------------------------------------------
# Fixtures: start the subprocesses once.
# ---------------------------------------------------------------------------


def _env(devices):
    from conftest import xla_compile_flags

    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # Compiling dominates these runs; LLVM's -O0 halves it, and so do the suite's other compile flags
    # (conftest.xla_compile_flags). Every run compared uses the same flags, and XLA's own fusion and
    # tiling (which set the float results) are unchanged.
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *xla_compile_flags()])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _wait(proc, what, log):
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != 0:
        with open(log) as f:
            pytest.fail(f"{what} failed (exit {proc.returncode}):\n{f.read()[-4000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parallel"))
    mp_workdir = os.path.join(out, "two_processes")
    logs = {k: os.path.join(out, f"{k}.log") for k in ("worker", "multiprocess")}
    t0 = time.perf_counter()
    # Both started at once: each process compiles on its own core.
    with open(logs["worker"], "w") as wl, open(logs["multiprocess"], "w") as ml:
        worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), out], cwd=ROOT, env=_env(8),
                                  stdout=wl, stderr=subprocess.STDOUT)
        multi = subprocess.Popen(
            [sys.executable, "-m", "launch.local_multiprocess", "--num_processes", "2", "--devices_per_process", "2",
             "--timeout", str(TIMEOUT), "--",
             sys.executable, "-m", "launch.train", "--config", "configs/tiny.py", "--workdir", mp_workdir,
             "--config.sample.num=4", f"--config.optim.eps={ADAM_EPS}"],
            cwd=ROOT, env=_env(1), stdout=ml, stderr=subprocess.STDOUT,
        )
        _wait(worker, "the 8-device worker", logs["worker"])
        _wait(multi, "the 2-process run", logs["multiprocess"])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    results["seconds"] = time.perf_counter() - t0
    return out, results


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _npz_leaves(path):
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


@pytest.fixture(scope="module")
def reference(runs):
    """The 1-device reference run's newest checkpoint, restored in this (1-device) process."""
    out, _ = runs
    return restore_host(os.path.join(out, "ref"), parallel.make_mesh())[1]


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


def test_sampling_same_images_on_1_2_4_8_devices(runs):
    """Same key, same images on 1, 2, 4 and 8 devices, to 1e-6, with the network computed in
    float64 (x64 on; its float32 output cast is kept). The keys, the padding of 30 rows to 32,
    the labels and the split are what is under test: any mistake there moves samples by O(1)."""
    out, results = runs
    assert results["threefry_partitionable"] is True  # JAX's default, which the invariance rests on
    one = np.load(os.path.join(out, "samples_f64_1.npy"))
    assert one.shape == (30, 8, 8, 1) and np.all(np.isfinite(one)) and one.std() > 0.1
    for n in (2, 4, 8):
        np.testing.assert_allclose(np.load(os.path.join(out, f"samples_f64_{n}.npy")), one, rtol=0, atol=1e-6,
                                   err_msg=f"{n} devices")
    # The sampler's loop really ran split over the devices (its output is the scan carry).
    assert results["sample_output_specs"] == ["one device"] + [str(P("data"))] * 3


def test_launch_sample_same_array_on_8_devices_as_on_1(runs):
    """``python -m launch.sample --out FILE.npz`` with 8 devices against generate on 1 device, both
    float32 as users run them. XLA:CPU's matmul and reduction kernels tile by shape, so the
    network's float32 outputs differ in the last bit between per-device batch sizes (measured:
    <= 3e-8); the first DDIM step turns eps into x_0 with the factor sigma/alpha at t = T-1,
    406 for this cosine schedule, so a 1-ulp difference in eps (|eps| <= 4: 4 * 2**-23) may move
    a sample by up to 406 * 4 * 2**-23 = 2e-4 (measured: ~4e-6). A wrong key, label or row
    moves it by O(1)."""
    out, _ = runs
    one = np.load(os.path.join(out, "samples_f32_1.npy"))
    # generate's batch b is exactly jdiff.sample(model_fn, schedule, shape, fold_in(key, b)).
    np.testing.assert_array_equal(np.load(os.path.join(out, "samples_direct.npy")), one)
    c = tiny_config()
    from jdiff.train import config as config_lib

    alphas_cumprod = np.asarray(config_lib.make_schedule(c).alphas_cumprod, np.float64)
    amplification = np.sqrt((1 - alphas_cumprod[-1]) / alphas_cumprod[-1])
    assert 400 < amplification < 410
    with np.load(os.path.join(out, "samples_cli_8.npz")) as z:
        np.testing.assert_array_equal(z["labels"], [3] * 30)
        assert z["samples"].dtype == np.float32
        np.testing.assert_allclose(z["samples"], one, rtol=0, atol=amplification * 4 * 2.0**-23)
        # Most elements are not amplified at all (clipped x_0, or equal network outputs).
        assert np.mean(np.abs(z["samples"] - one) <= 1e-6) > 0.99


def test_train_steps_same_params_on_1_and_8_devices_with_fsdp(runs, reference):
    out, results = runs
    eight = _npz_leaves(os.path.join(out, "fsdp8_state.npz"))
    assert len(eight) == len(reference)
    # Params, EMA params, Adam's moments, step and key; float32 rounding apart (measured: 1.5e-8),
    # equal. Not bit-identical: see the module docstring and tiny_config.
    for a, b in zip(reference, eight):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-7)
    step_and_rng = [x for x in reference if x.dtype != np.float32]
    assert any(x.shape == () and int(x) == 6 for x in step_and_rng)
    # The run really was sharded: FSDP split the larger leaves over the 8 devices.
    specs = results["fsdp8_saved_specs"]
    assert sum("data" in s for s in specs) >= 20 and any("data" not in s for s in specs), specs
    lines = _jsonl(os.path.join(out, "fsdp8", "metrics.jsonl"))
    ref_lines = _jsonl(os.path.join(out, "ref", "metrics.jsonl"))
    np.testing.assert_allclose([m["loss"] for m in lines], [m["loss"] for m in ref_lines], rtol=1e-5)


def test_checkpoint_from_8_devices_restores_on_1(runs):
    out, _ = runs
    assert jax.device_count() == 1
    state, leaves = restore_host(os.path.join(out, "fsdp8"), parallel.make_mesh())
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state))
    for a, b in zip(_npz_leaves(os.path.join(out, "fsdp8_state.npz")), leaves):
        np.testing.assert_array_equal(b, a)


def test_checkpoint_from_8_devices_restores_on_a_4x2_mesh(runs):
    out, results = runs
    for a, b in zip(_npz_leaves(os.path.join(out, "fsdp8_state.npz")), _npz_leaves(os.path.join(out, "fsdp8_on_4x2.npz"))):
        np.testing.assert_array_equal(b, a)
    placed = results["fsdp8_on_4x2"]
    assert all(p["devices"] == 8 for p in placed)
    split = [p for p in placed if "data" in p["spec"]]
    assert len(split) >= 20 and all(p["shards"] == 4 for p in split)  # 4 distinct shards, each on 2 devices


def test_checkpoint_from_1_device_restores_on_4(runs, reference):
    out, results = runs
    for a, b in zip(reference, _npz_leaves(os.path.join(out, "ref_on_4.npz"))):
        np.testing.assert_array_equal(b, a)
    placed = results["ref_on_4"]
    assert all(p["devices"] == 4 for p in placed)
    split = [p for p in placed if "data" in p["spec"]]
    assert len(split) >= 20 and all(p["shards"] == 4 for p in split)


def test_two_processes_match_the_single_process_run(runs, reference):
    out, _ = runs
    workdir = os.path.join(out, "two_processes")
    _, leaves = restore_host(workdir, parallel.make_mesh())
    for a, b in zip(reference, leaves):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-7)  # measured: 1.5e-8
    # Each process wrote its own shards; only process 0 wrote the logs (once per step).
    names = os.listdir(os.path.join(workdir, "checkpoints", "6", "default"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(names), names
    lines = _jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in lines] == [2, 3, 4, 6]
    ref_lines = _jsonl(os.path.join(out, "ref", "metrics.jsonl"))
    np.testing.assert_allclose([m["loss"] for m in lines], [m["loss"] for m in ref_lines], rtol=1e-5)
    assert os.path.getsize(os.path.join(workdir, "samples.png")) > 0
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert json.load(f)["step"] == 6


def test_batch_size_not_divisible_by_devices_names_both(runs):
    _, results = runs
    e = results["errors"]
    assert "config.data.batch_size" in e["train"] and "12 examples" in e["train"] and "8 devices" in e["train"]
    assert not e["train_workdir_created"]
    assert "12 examples" in e["global_batch"] and "8 devices" in e["global_batch"]


def test_global_batch_and_fsdp_rule(runs):
    _, results = runs
    g = results["global_batch"]
    assert g["spec"] == str(P("data")) and g["values"] == list(range(16))
    assert g["shard_rows"] == [[2 * i, 2 * i + 1] for i in range(8)]
    rule = results["fsdp_rule"]
    assert rule["(3, 3, 16, 32)"] == str(P(None, None, None, "data"))  # largest divisible axis
    assert rule["(3, 3, 32, 16)"] == str(P(None, None, "data", None))
    assert rule["(24, 40)"] == str(P(None, "data"))
    assert rule["(16,)"] == str(P())  # below min_size
    assert rule["(4, 4, 4, 3)"] == str(P())  # no axis divisible by 8
    assert rule["(10, 30)"] == str(P())


def test_initialize_distributed_reads_and_checks_its_arguments():
    assert parallel.initialize_distributed(environ={}) is False  # single process: nothing to do
    assert parallel.initialize_distributed(environ={"JAX_NUM_PROCESSES": "1"}) is False
    cases = [
        ({"environ": {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2"}}, "process_id.*None"),
        ({"coordinator": "localhost:1234", "num_processes": 2, "process_id": 2, "environ": {}}, r"process_id.*\[0, 2\).*2"),
        ({"num_processes": 2, "process_id": 0, "environ": {}}, "coordinator.*host:port"),
        ({"coordinator": "localhost", "num_processes": 2, "process_id": 0, "environ": {}}, "coordinator.*'localhost'"),
        ({"environ": {"JAX_NUM_PROCESSES": "two"}}, "JAX_NUM_PROCESSES.*'two'"),
        ({"coordinator": "auto", "num_processes": 4, "environ": {}}, "auto.*num_processes=4"),
        ({"coordinator": "localhost:1234", "environ": {}}, "num_processes.*None"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            parallel.initialize_distributed(**kwargs)


def test_make_mesh_and_batch_checks_on_one_device():
    mesh = parallel.make_mesh()
    assert parallel.data_axis_size(mesh) == 1 and mesh.axis_names == ("data",)
    with pytest.raises(ValueError, match=r"num_devices.*\[1, 1\].*got 2"):
        parallel.make_mesh(2)
    with pytest.raises(ValueError, match="axis_name.*'model'"):
        parallel.data_sharding(mesh, "model")
    with pytest.raises(ValueError, match="leading.*batch"):
        parallel.global_batch({"image": np.zeros((4, 2)), "label": np.zeros((3,))}, mesh)
    with pytest.raises(ValueError, match="min_size"):
        parallel.param_shardings({"w": np.zeros((4,))}, mesh, True, min_size=0)


def test_local_launcher_sets_the_environment_and_fails_if_any_process_fails():
    show = "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], os.environ['XLA_FLAGS'])"
    outputs = local_multiprocess.run([sys.executable, "-c", show], 3, 2, echo=False, timeout=60)
    assert [o.split()[:2] for o in outputs] == [["0", "3"], ["1", "3"], ["2", "3"]]
    for o in outputs:  # the device count set, the other flags (the suite's -O0, conftest.py) kept
        assert [f for f in o.split()[2:] if "device_count" in f] == ["--xla_force_host_platform_device_count=2"], o
    # Process 1 fails while process 0 would wait for it for a minute: the launcher stops it.
    hang = "import os, sys, time; pid = int(os.environ['JAX_PROCESS_ID']); time.sleep(60) if pid == 0 else sys.exit(3)"
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="process 1 exited with code 3"):
        local_multiprocess.run([sys.executable, "-c", hang], 2, echo=False, timeout=120)
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ValueError, match="num_processes.*0"):
        local_multiprocess.run([sys.executable, "-c", "pass"], 0)


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_use_cpu_cores_then_a_plain_sample_splits_its_batch_with_the_same_samples(tmp_path):
    """``jdiff.parallel.use_cpu_cores(2)`` in a fresh process, then plain ``jdiff.sample`` calls:
    a batch of 8 runs split over the 2 CPU devices, a batch of 7 (not divisible) and a call
    whose params the caller committed to device 0 on one; the split samples equal the one-device
    ones to float32 rounding of the network (relative 1e-5: a wrong key or row order moves
    them by O(1)). tests/workers/cpu_cores.py."""
    from conftest import xla_compile_flags

    env = _env(1)
    env["XLA_FLAGS"] = " ".join(xla_compile_flags())  # no device count: use_cpu_cores sets it
    out = tmp_path / "cpu_cores.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "cpu_cores.py"), str(out)], cwd=ROOT,
                   env=env, check=True, timeout=TIMEOUT)
    results = json.loads(out.read_text())
    assert results["use_cpu_cores"] == 2 and results["devices"] == 2 and results["second_call"] == 2
    for name, case in results["cases"].items():
        batch = int(name.split("_")[1])
        assert case["split_devices"] == (2 if batch % 2 == 0 else 1), (name, case)
        assert case["ref_devices"] == 1 and case["finite"] and case["std"] > 0.1, (name, case)
        assert case["max_abs_diff"] <= 1e-5 * case["max_abs"], (name, case)


def test_use_cpu_cores_after_jax_started_names_the_fix(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    jax.devices()  # this process's backend is up with one CPU device
    assert parallel.use_cpu_cores(1) == 1  # the count it has: nothing to change
    with pytest.raises(RuntimeError, match=r"already started with 1 CPU device.*before anything runs on a device"):
        parallel.use_cpu_cores(2)
    with pytest.raises(ValueError, match=r"num_devices: expected a positive int, got 0"):
        parallel.use_cpu_cores(0)
    assert parallel.auto_batch_sharding(8) is None  # one device: nothing to split


_FAULTS_SCRIPT = r"""
import ctypes, json, resource, sys
import jax, jax.numpy as jnp
from jdiff import parallel
f = jax.jit(lambda x: jnp.sin(x) * 2.0)  # a fresh 16 MiB output buffer per call
x = jnp.ones((2048, 2048), jnp.float32)
f(x).block_until_ready()

def faults():  # per call, the median of 15 calls
    counts = []
    for _ in range(15):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()  # the result is freed at once
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return sorted(counts)[len(counts) // 2]

mallopt = ctypes.CDLL(None).mallopt
mallopt(-3, 128 * 1024), mallopt(-1, 128 * 1024)  # glibc's default thresholds, held fixed
before = faults()
retained = parallel.retain_host_memory()
for _ in range(40):  # the heap of each XLA thread's arena grows once, by the buffer (the calls land on
    f(x).block_until_ready()  # any thread of XLA's pool, so enough of them for every thread's arena)
json.dump({"before": before, "after": faults(), "retained": retained}, sys.stdout)
"""


def test_retain_host_memory_stops_the_page_faults_of_freed_buffers():
    """With glibc's default thresholds a freed 16 MiB result is unmapped and the next call faults
    its 4,096 pages in again; after ``retain_host_memory()`` (and a few calls that grow the
    heaps of the threads' malloc arenas: one CI run under load needed more than 5) the heap keeps it. Minor faults per call, counted by
    getrusage (the median of 15 calls: no timing)."""
    env = _env(1)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], cwd=ROOT, env=env, check=True, timeout=TIMEOUT,
                         capture_output=True, text=True).stdout
    result = json.loads(out)
    assert result["retained"] is True, result
    assert result["before"] >= 4096 * 0.9, result  # the buffer's pages, faulted in per call
    assert result["after"] <= 4096 * 0.05, result


def test_retain_host_memory_leaves_the_users_settings_and_checks_its_argument(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert parallel.retain_host_memory() is False  # the user's own glibc setting wins
    with pytest.raises(ValueError, match=r"threshold_bytes: expected an int in \[1, 2\*\*31\), got 0"):
        parallel.retain_host_memory(0)
    with pytest.raises(ValueError, match=r"threshold_bytes: expected an int in \[1, 2\*\*31\), got 4294967296"):
        parallel.retain_host_memory(2**32)
