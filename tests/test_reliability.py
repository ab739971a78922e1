"""Fault injection: corrupt, transient and incompatible checkpoints, processes that disagree,
non-finite steps, data order after resume, retention, async saves, and a checkpoint committed by
an earlier release. The kill tests (SIGKILL at random moments, during saves) are marked slow.
RELIABILITY.md is the table of what is shown here.
"""

import errno
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jdiff import data as data_lib
from jdiff.train import checkpoint as checkpoint_lib
from jdiff.train import loop, network
from jdiff.train.checkpoint import Checkpointer, IncompatibleCheckpointError, TransientCheckpointError
from jdiff.train.state import create_train_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import tiny  # noqa: E402

FORMAT_V1 = os.path.join(ROOT, "tests", "data", "checkpoint_format_v1")


def tiny_config(**overrides):
    c = tiny.get_config()
    c.sample.num = 4
    c.train.log_every = 1  # every step's loss in metrics.jsonl
    for k, v in overrides.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def abstract_state(config=None):
    """The tiny config's TrainState as ShapeDtypeStructs on this process's one device."""
    c = config or tiny_config()
    model = network.build_model(c)
    shapes = jax.eval_shape(lambda: create_train_state(network.init_params(model, (8, 8, 1), jax.random.key(0)),
                                                       make_optimizer(c.optim), jax.random.key(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def files(path):
    """{relative path: sha256} of every file under ``path``."""
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def losses_by_step(workdir):
    """step -> loss, from metrics.jsonl (a step logged twice, before and after a kill, must agree)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            assert out.get(m["step"], m["loss"]) == m["loss"], (m, out[m["step"]])
            out[m["step"]] = m["loss"]
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 uninterrupted steps of the tiny config, checkpoints at 3 and 6, every loss logged."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    loop.train_and_evaluate(tiny_config(), workdir)
    ck = Checkpointer(workdir)
    state = ck.restore(abstract_state(), move_aside=False)
    ck.close()
    return workdir, leaves(state)


# --------------------------------------------------------------------------- corrupt checkpoints


def _truncate(root, pattern, every=False):
    hits = sorted(p for p in glob.glob(os.path.join(root, pattern), recursive=True) if os.path.getsize(p) > 64)
    assert hits, pattern
    for p in hits if every else hits[:1]:
        with open(p, "r+b") as f:
            f.truncate(16)
    return hits[0]


def _garbage(root, rel):
    with open(os.path.join(root, rel), "w") as f:
        f.write("{not json")
    return os.path.join(root, rel)


def _remove(root, rel):
    os.remove(os.path.join(root, rel))
    return os.path.join(root, rel)


def _empty(root):
    for p in os.listdir(root):
        q = os.path.join(root, p)
        shutil.rmtree(q) if os.path.isdir(q) else os.remove(q)
    return root


CORRUPTIONS = {
    # name: (damage(step_dir) -> the file it damaged, what the warning says about it)
    "truncated array file": (lambda r: _truncate(r, "default/ocdbt.process_0/d/*"), "bytes, .* were written"),
    "truncated array file, no size list": (
        lambda r: (_remove(r, checkpoint_lib._FILES), _truncate(r, "default/**/d/*", every=True))[1], None),
    "missing commit marker": (lambda r: _remove(r, "commit_success.txt"), "no commit marker"),
    "garbage metadata": (lambda r: (_remove(r, checkpoint_lib._FILES), _garbage(r, "default/_METADATA"))[1],
                         "not valid JSON"),
    "garbage step metadata": (lambda r: (_remove(r, checkpoint_lib._FILES), _garbage(r, "_CHECKPOINT_METADATA"))[1],
                              "not valid JSON"),
    "missing array file": (lambda r: _remove(r, os.path.relpath(glob.glob(os.path.join(r, "default/ocdbt.process_0/d/*"))[0], r)),
                           "is missing"),
    "deleted directory contents": (_empty, "is empty"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_named_moved_aside_and_the_previous_one_restored(straight, tmp_path, kind, caplog):
    workdir = str(tmp_path / "w")
    shutil.copytree(straight[0], workdir)
    step_dir = os.path.join(workdir, "checkpoints", "6")
    damage, says = CORRUPTIONS[kind]
    damaged = damage(step_dir)
    before = files(step_dir)
    ck = Checkpointer(workdir)
    with caplog.at_level(logging.WARNING):
        state = ck.restore(abstract_state())
    assert int(state.step) == 3
    warning = "\n".join(r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage())
    assert "checkpoint 6" in warning
    if says:  # the checks before any read name the file and what is wrong with it
        assert damaged in warning and re.search(says, warning), warning
    else:  # only orbax's read finds it: the warning gives its error, which names what it was reading
        assert "Error" in warning and re.search(r"params\.\S+|checkpoints/6/default", warning), warning
    aside = os.path.join(workdir, "checkpoints.corrupt", "6")
    assert files(aside) == before  # moved, byte for byte, nothing deleted
    assert ck.steps() == [3]
    ck.save(state.replace(step=jnp.asarray(6, jnp.int32)))  # the next save at that step lands
    assert ck.steps() == [3, 6]
    ck.close()


def test_a_run_resumes_past_a_corrupt_checkpoint_with_the_same_data_and_result(straight, tmp_path, monkeypatch):
    """Newest checkpoint corrupt, and the run crashed once more on the way: the final state is
    bit-identical to the uninterrupted run's, and the steps that count fed exactly the same
    examples (none duplicated or skipped)."""
    workdir = str(tmp_path / "w")
    shutil.copytree(straight[0], workdir)
    _remove(os.path.join(workdir, "checkpoints", "6"), "commit_success.txt")
    fed, crashed = [], []
    real = data_lib.batch_at

    def recording(source, step, **kw):
        if step == 5 and not crashed:
            crashed.append(step)
            raise KeyboardInterrupt("simulated crash before step 5")
        plan = {k: kw[k] for k in ("batch_size", "seed")}
        fed.append((step, data_lib.batch_indices(step, num_examples=data_lib.source_length(source), **plan).tolist()))
        return real(source, step, **kw)

    monkeypatch.setattr(loop.data_lib, "batch_at", recording)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(tiny_config(), workdir)  # resumes at 3, crashes before step 5
    assert Checkpointer(workdir).steps() == [3]  # no save after 3 happened: 4 is not a multiple of 3
    loop.train_and_evaluate(tiny_config(), workdir)
    assert [s for s, _ in fed] == [3, 4, 3, 4, 5]  # the crash redoes 3, 4 from the checkpoint
    effective = dict(fed)  # the last time each step ran is what the final state saw
    n = data_lib.source_length(data_lib.get_dataset(tiny_config().data).source)
    want = {s: data_lib.batch_indices(s, num_examples=n, batch_size=16, seed=0).tolist() for s in range(6)}
    assert {s: effective[s] for s in (3, 4, 5)} == {s: want[s] for s in (3, 4, 5)}
    seen = [i for s in range(6) for i in want[s]]
    assert len(seen) == len(set(seen))  # within the first epoch, no example twice
    ck = Checkpointer(workdir)
    for a, b in zip(leaves(ck.restore(abstract_state(), move_aside=False)), straight[1]):
        np.testing.assert_array_equal(a, b)
    ck.close()
    assert losses_by_step(workdir) == losses_by_step(straight[0])


# --------------------------------------------------------------------------- transient and incompatible


def test_transient_read_errors_are_retried_then_reported_without_moving_anything(straight, tmp_path, monkeypatch, caplog):
    workdir = str(tmp_path / "w")
    shutil.copytree(straight[0], workdir)
    real = Checkpointer._restore_step
    failures = {"left": 2}

    def flaky(self, step, abstract):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(self, step, abstract)

    monkeypatch.setattr(Checkpointer, "_restore_step", flaky)
    ck = Checkpointer(workdir, backoff=0.0)
    with caplog.at_level(logging.WARNING):
        assert int(ck.restore(abstract_state()).step) == 6  # two failures, then the read succeeds
    assert sum("transient read error" in r.getMessage() for r in caplog.records) == 2
    ck.close()

    failures["left"] = 10**6  # it does not pass
    before = files(os.path.join(workdir, "checkpoints"))
    ck = Checkpointer(workdir, backoff=0.0, retries=3)
    with pytest.raises(TransientCheckpointError, match=r"checkpoint 6 .*Errno 5.* after 3 retries.*nothing was moved"):
        ck.restore(abstract_state())
    ck.close()
    assert files(os.path.join(workdir, "checkpoints")) == before  # no fallback to 3, nothing moved
    assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))
    assert checkpoint_lib.is_transient(ValueError("UNAVAILABLE: connection reset"))
    assert not checkpoint_lib.is_transient(ValueError("User-provided restore item and on-disk value metadata"))


def test_keys_of_another_prng_implementation_are_a_clear_error(straight, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(straight[0], workdir)
    with open(os.path.join(workdir, "checkpoints", "6", "_CHECKPOINT_METADATA")) as f:
        assert json.load(f)["custom_metadata"]["jdiff"]["prng_impl"] == "threefry2x32"
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        target = abstract_state()  # rbg keys: 4 words of key data instead of 2
        ck = Checkpointer(workdir)
        with pytest.raises(IncompatibleCheckpointError, match=r"'threefry2x32' keys but this process uses 'rbg' "
                                                              r"\(jax_default_prng_impl\)"):
            ck.restore(target)
        ck.close()
    finally:
        jax.config.update("jax_default_prng_impl", previous)
    assert Checkpointer(workdir).steps() == [3, 6]


def test_processes_restore_the_same_step_or_all_stop(tmp_path):
    """2 processes x 2 devices (jax.distributed + gloo): a step that reads as corrupt on one
    process only is skipped by both (and moved aside once); a transient error on one process
    stops both, nothing moved (tests/workers/checkpoint_agreement.py)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "launch.local_multiprocess", "--num_processes", "2", "--devices_per_process", "2",
         "--timeout", "300", "--", sys.executable, os.path.join(ROOT, "tests", "workers", "checkpoint_agreement.py"),
         str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [json.load(open(tmp_path / f"result_{i}.json")) for i in (0, 1)]
    for res in results:
        assert res["process_count"] == 2 and res["devices"] == 4
        assert res["healthy"]["step"] == 3 and res["healthy"]["steps_after"] == [1, 2, 3]
        assert res["corrupt"]["step"] == 2 and res["corrupt"]["steps_after"] == [1, 2] and res["corrupt"]["aside"] == ["3"]
        assert res["transient"]["error"] == "TransientCheckpointError" and res["transient"]["steps_after"] == [1, 2, 3]
        assert res["transient"]["aside"] == []
    assert results[0]["corrupt"]["w_sum"] == results[1]["corrupt"]["w_sum"] == float(np.sum(np.arange(24) + 2))
    assert "Errno 5" in results[1]["transient"]["message"] and "another process" in results[0]["transient"]["message"]


# --------------------------------------------------------------------------- non-finite steps


def _poison(monkeypatch, steps):
    real = data_lib.batch_at

    def poisoned(source, step, **kw):
        b = real(source, step, **kw)
        return dict(b, image=np.full_like(b["image"], np.nan)) if step in steps else b

    monkeypatch.setattr(loop.data_lib, "batch_at", poisoned)


def test_skip_policy_skips_non_finite_steps_and_stops_past_its_limit(straight, tmp_path, monkeypatch, caplog):
    """config.optim.skip_nonfinite = 2: a NaN batch at step 4 (update 5) is skipped (params and
    optimizer state unchanged by it) and the run finishes with finite checkpoints; three in a row
    stop the run, naming the step, with the last good checkpoint intact."""
    opt = make_optimizer(tiny_config(**{"optim.skip_nonfinite": 2}).optim)
    params = {"w": jnp.ones(3)}
    opt_state = opt.init(params)
    updates, new_state = opt.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, opt_state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)
    assert int(new_state.notfinite_count) == 1

    c = tiny_config(**{"optim.skip_nonfinite": 2})
    # The option changes the optimizer state's tree: a checkpoint without it is incompatible,
    # named as such (the fingerprint does not cover optimizer options).
    other = str(tmp_path / "other")
    shutil.copytree(straight[0], other)
    with pytest.raises(IncompatibleCheckpointError, match=r"opt_state/inner_state"):
        loop.train_and_evaluate(c, other)

    workdir = str(tmp_path / "skip")
    _poison(monkeypatch, {4})
    with caplog.at_level(logging.WARNING):
        final = loop.train_and_evaluate(c, workdir)
    assert final["step"] == 6 and any("step 5: non-finite gradients, update skipped" in r.getMessage() for r in caplog.records)
    ck = Checkpointer(workdir)
    assert ck.steps() == [3, 6]
    state = ck.restore(abstract_state(c), move_aside=False)
    ck.close()
    assert all(np.isfinite(x).all() for x in leaves(state.params) + leaves(state.ema_params))
    assert int(state.opt_state.total_notfinite) == 1

    stopped = str(tmp_path / "stop")
    _poison(monkeypatch, {3, 4, 5})
    with pytest.raises(loop.NonFiniteLossError, match=r"step 6.*3 steps in a row, config.optim.skip_nonfinite=2"):
        loop.train_and_evaluate(c, stopped)
    assert Checkpointer(stopped).steps() == [3]


# --------------------------------------------------------------------------- retention, async saves


@flax.struct.dataclass
class _Small:
    step: jax.Array
    w: jax.Array


def test_retention_keeps_exactly_n_across_restarts_and_a_move_aside(tmp_path):
    workdir = str(tmp_path / "w")
    for first, last in [(1, 7), (8, 12), (13, 20)]:  # three "processes", each a new Checkpointer
        ck = Checkpointer(workdir, keep=3)
        for s in range(first, last + 1):
            ck.save(_Small(jnp.asarray(s, jnp.int32), jnp.full((4,), float(s))))
            assert len(ck.steps()) <= 3
        ck.close()
        assert Checkpointer(workdir).steps() == [last - 2, last - 1, last]
    _remove(os.path.join(workdir, "checkpoints", "20"), "commit_success.txt")
    ck = Checkpointer(workdir, keep=3)
    restored = ck.restore(_Small(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.float32)))
    assert int(restored.step) == 19 and ck.steps() == [18, 19]
    for s in (20, 21, 22):
        ck.save(_Small(jnp.asarray(s, jnp.int32), jnp.full((4,), float(s))))
    ck.close()
    assert Checkpointer(workdir).steps() == [20, 21, 22]
    assert os.listdir(os.path.join(workdir, "checkpoints.corrupt")) == ["20"]  # kept, outside the retention count


def test_async_save_returns_before_the_files_are_written_and_survives_donation(tmp_path):
    """save() returns once the arrays are off the device; the state's buffers can then be
    donated and overwritten while the files are written, and the checkpoint holds the values
    at save time."""
    w = jnp.arange(1 << 20, dtype=jnp.float32)  # 4 MB
    state = _Small(jnp.asarray(1, jnp.int32), w)
    expected = np.asarray(w).copy()
    ck = Checkpointer(str(tmp_path / "w"))
    ck.save(state)
    bump = jax.jit(lambda s: s.replace(w=s.w * 0 - 1.0), donate_argnums=0)
    state = bump(state)
    jax.block_until_ready(state)
    ck.close()
    ck = Checkpointer(str(tmp_path / "w"))
    restored = ck.restore(_Small(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct(w.shape, w.dtype)))
    np.testing.assert_array_equal(np.asarray(restored.w), expected)
    with open(os.path.join(str(tmp_path / "w"), "checkpoints", "1", checkpoint_lib._FILES)) as f:
        assert sum(json.load(f).values()) > 1 << 20  # the size list was written once the save finished
    ck.close()
    assert ocp.CheckpointManagerOptions().enable_async_checkpointing


# --------------------------------------------------------------------------- format stability


def test_a_checkpoint_written_by_release_1_restores(tmp_path):
    """tests/data/checkpoint_format_v1: a tiny-config workdir written by this release (orbax
    files, JSON metadata, no pickle), with the SHA-256 of every leaf. Every later release must
    restore it to the same bytes, through the Checkpointer and through launch.sample's loader."""
    from jdiff.workdir import load_for_sampling

    workdir = str(tmp_path / "v1")
    shutil.copytree(FORMAT_V1, workdir)
    with open(os.path.join(FORMAT_V1, "leaves.json")) as f:
        want = json.load(f)
    ck = Checkpointer(workdir)
    state = ck.restore(abstract_state(), move_aside=False)
    ck.close()
    got = {checkpoint_lib._path(k): hashlib.sha256(np.ascontiguousarray(np.asarray(v)).tobytes()).hexdigest()
           for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert got == want["sha256"]
    assert int(state.step) == want["step"]
    loaded = load_for_sampling(workdir)
    assert loaded.step == want["step"] and loaded.image_shape == (8, 8, 1)
    assert files(workdir) == files(FORMAT_V1)  # reading changed nothing


def write_format_checkpoint(out: str) -> None:
    """Regenerate tests/data/checkpoint_format_v1 (only when the format is deliberately changed:
    then add a v2 beside it, keep v1 and its test)."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    c = tiny_config(**{"train.num_steps": 2, "train.checkpoint_every": 2})
    loop.train_and_evaluate(c, tmp)
    ck = Checkpointer(tmp)
    state = ck.restore(abstract_state(c), move_aside=False)
    ck.close()
    keep = {"experiment.json", "config.json", "checkpoints"}
    for name in os.listdir(tmp):
        if name not in keep:
            p = os.path.join(tmp, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    with open(os.path.join(tmp, "leaves.json"), "w") as f:
        json.dump({"step": int(state.step), "sha256": {
            checkpoint_lib._path(k): hashlib.sha256(np.ascontiguousarray(np.asarray(v)).tobytes()).hexdigest()
            for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}}, f, indent=1, sort_keys=True)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


if __name__ == "__main__" and sys.argv[1:2] == ["write-format-checkpoint"]:
    write_format_checkpoint(FORMAT_V1)


# --------------------------------------------------------------------------- kills (slow)


@pytest.mark.slow
def test_sigkill_during_saves_20_times_leaves_only_finished_steps(tmp_path):
    """20 times: SIGKILL the saving process at a random moment during a save (0-400 ms after it
    starts); the newest visible step is always the previous finished one (or the one being
    saved, if it finished in time), every visible step restores to what was saved, and the
    next process resumes and saves normally (tests/workers/save_forever.py, each process a child
    of tests/forked.py's fork server)."""
    import forked

    sys.path.insert(0, os.path.join(ROOT, "tests", "workers"))
    import save_forever

    workdir = str(tmp_path / "w")
    rng = random.Random(0)
    outcomes = []
    for trial in range(20):
        proc = forked.popen_function("save_forever", "main", workdir)
        target_saves = rng.randint(1, 3)
        for line in forked.follow(proc):
            kind, step = line.split()
            if kind == "saving" and int(step) - (outcomes[-1]["resumed"] if outcomes else 0) >= target_saves:
                time.sleep(rng.uniform(0.0, 0.4))
                proc.send_signal(signal.SIGKILL)
                break
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (trial, proc.returncode, err[-2000:])
        finished, saving = None, None
        for line in out.splitlines():  # all it printed before dying (it may have got further than read)
            kind, step = line.split()
            if kind in ("resumed", "saved"):
                finished = int(step)
            elif kind == "saving":
                saving = int(step)
        ck = Checkpointer(workdir)
        steps = ck.steps()
        assert steps[-1] in (finished, saving), (trial, steps, finished, saving)
        state = ck.restore(save_forever.target(), move_aside=False)
        np.testing.assert_array_equal(np.asarray(state.w), save_forever.values(int(state.step)))
        ck.close()
        outcomes.append({"resumed": steps[-1], "killed_while_saving": saving, "visible": steps})
    assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))  # nothing was ever half-visible
    assert sum(o["visible"][-1] == o["killed_while_saving"] - 1 for o in outcomes) >= 5, outcomes  # most kills hit a save


@pytest.mark.slow
def test_sigkill_at_5_random_moments_then_resume_is_bit_identical(tmp_path):
    """A real `launch.train` process SIGKILLed at 5 random moments (one of them while a
    checkpoint is being written), restarted each time with the same command: params, EMA,
    optimizer state, step, RNG and every per-step loss equal the uninterrupted run's. Then
    SIGTERM (a preemption notice): it saves the step it is at, exits 0, and resumes from there.
    Each process is a child of tests/forked.py's fork server running the command's main."""
    import forked

    args = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--config.train.num_steps=40",
            "--config.train.checkpoint_every=5", "--config.train.log_every=1", "--config.sample.num=4"]
    start = lambda wd: forked.popen_module("launch.train", *args, "--workdir", wd)  # noqa: E731

    def run(wd):
        r = forked.run_module("launch.train", *args, "--workdir", wd)
        assert r.returncode == 0, r.stderr[-2000:]

    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    run(full)

    def logged(wd):
        path = os.path.join(wd, "metrics.jsonl")
        return sum(1 for _ in open(path)) if os.path.exists(path) else 0

    def saving(wd):
        return glob.glob(os.path.join(wd, "checkpoints", "*tmp*"))

    rng = random.Random(1)
    kills = []
    for trial in range(5):
        proc = start(killed)
        start_losses = logged(killed)
        wait_for = rng.randint(1, 6)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if trial == 2 and saving(killed):  # during a save
                break
            if trial != 2 and logged(killed) - start_losses >= wait_for:
                time.sleep(rng.uniform(0, 0.2))
                break
            time.sleep(0.002)
        during_save = bool(saving(killed))
        assert proc.poll() is None, (trial, proc.returncode, proc.communicate()[1][-2000:])  # killed, not ended
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append({"after_losses": logged(killed), "during_save": during_save,
                      "steps": Checkpointer(killed).steps()})
    assert any(k["during_save"] for k in kills), kills
    run(killed)
    ck_full, ck_killed = Checkpointer(full), Checkpointer(killed)
    a, b = ck_full.restore(abstract_state(), move_aside=False), ck_killed.restore(abstract_state(), move_aside=False)
    assert int(a.step) == int(b.step) == 40
    for x, y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]):
        np.testing.assert_array_equal(np.asarray(x[1]), np.asarray(y[1]), err_msg=checkpoint_lib._path(x[0]))
    ck_full.close(), ck_killed.close()
    assert losses_by_step(killed) == losses_by_step(full)  # and every step logged twice agreed with itself
    assert sorted(losses_by_step(full)) == list(range(1, 41))

    termed = str(tmp_path / "termed")
    proc = start(termed)
    deadline = time.time() + 300
    while logged(termed) < 12 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = json.loads(out[out.index("{"):])
    assert stopped["preempted"] and 12 <= stopped["step"] < 40, stopped
    assert Checkpointer(termed).steps()[-1] == stopped["step"]  # saved where it stopped, not at a multiple of 5
    assert not os.path.exists(os.path.join(termed, "samples.png"))
    run(termed)
    ck = Checkpointer(termed)
    for x, y in zip(leaves(ck.restore(abstract_state(), move_aside=False)), leaves(a)):
        np.testing.assert_array_equal(x, y)
    ck.close()
