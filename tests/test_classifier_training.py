"""The noise-aware classifier's training step and its use as a guidance log-probability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import data as data_lib
from jdiff import guidance
from jdiff.models import NoiseAwareClassifier
from jdiff.train import classifier as clf
from jdiff.train import config as config_lib
from jdiff.train.state import create_train_state, make_optimizer


def small_config():
    c = config_lib.base_config()
    c.model.num_classes = 10
    c.model.base_channels = 8
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = ()
    c.model.mid_attention = False
    c.model.pool = "mean"
    c.diffusion.num_timesteps = 50
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.optim.ema_decay = 0.9
    c.data.batch_size = 64
    return c


@pytest.fixture(scope="module")
def trained():
    c = small_config()
    module = NoiseAwareClassifier.from_config(c.model)
    schedule = config_lib.make_schedule(c)
    opt = make_optimizer(c.optim)
    # Each jitted: op by op, every initialiser and optimizer-state leaf would compile on its own.
    params = jax.jit(clf.init_classifier, static_argnums=(0, 1))(module, (8, 8, 1), jax.random.key(0))
    state = jax.jit(create_train_state, static_argnums=1)(params, opt, jax.random.key(1))
    apply = lambda p, x, t, train=False, rngs=None: module.apply({"params": p}, x, t, train=train, rngs=rngs)  # noqa: E731
    step = jax.jit(clf.make_classifier_train_step(apply, schedule, opt, c))
    ds = data_lib.get_dataset(c.data)
    losses = []
    for s in range(120):
        b = data_lib.batch_at(ds.source, s, batch_size=64, seed=0)
        state, m = step(state, {"image": b["image"], "label": b["label"]})
        losses.append(float(m["loss"]))
    return module, state, schedule, losses


def test_training_learns_to_classify_noisy_digits(trained):
    module, state, schedule, losses = trained
    # Averaged over uniform t, where x_t near T carries no class information (loss log 10).
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
    images, labels = data_lib.load_digits("test")
    acc = clf.noisy_accuracy(module, state.params, schedule, images, labels, jax.random.key(0), fractions=(0.0, 0.9))
    assert acc["test_accuracy_t0.00"] > 0.7  # chance is 0.1
    assert acc["test_accuracy_t0.00"] > acc["test_accuracy_t0.90"]


def test_log_prob_fn_feeds_classifier_guidance(trained):
    module, state, schedule, _ = trained
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t = jnp.full((4,), 10, jnp.int32)
    y = jnp.arange(4)

    # One program: op by op, the classifier's forward and backward passes would compile per op.
    @jax.jit
    def computed(params, x, t, y):
        lp = clf.log_prob_fn(module, params)
        logits = module.apply({"params": params}, x, t)
        uncond = lambda x_t, t_: jnp.zeros_like(x_t)  # noqa: E731
        guided = guidance.classifier(uncond, lp, 2.0, schedule)
        grad = jax.grad(lambda xx: lp(xx, t, y).sum())(x)
        return lp(x, t, y), jax.nn.log_softmax(logits)[jnp.arange(4), y], guided(x, t, y), grad

    lp, want, guided, grad = computed(state.params, x, t, y)
    np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-6)
    sqrt_1m = np.sqrt(1 - np.asarray(schedule.alphas_cumprod)[10])
    np.testing.assert_allclose(guided, -2.0 * sqrt_1m * grad, rtol=1e-4, atol=1e-6)


def test_train_classifier_writes_resumes_and_checks_the_mesh(tmp_path):
    """train_classifier: checkpoints and metrics in the workdir, resume continues from the last
    step (restored onto the abstract state, on the default mesh), and bad input is an error
    before anything is written."""
    import json
    import os

    from jdiff import parallel
    from jdiff.train.checkpoint import Checkpointer

    c = small_config()
    c.data.batch_size = 16
    c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    workdir = str(tmp_path / "clf")
    first = clf.train_classifier(c, workdir, mesh=parallel.make_mesh(1))
    assert first["step"] == 4 and 0.0 <= first["test_accuracy_t0.00"] <= 1.0
    assert Checkpointer(workdir).steps() == [2, 4]
    c.train.num_steps = 6
    again = clf.train_classifier(c, workdir)
    assert again["step"] == 6 and Checkpointer(workdir).steps() == [2, 4, 6]
    logged = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert logged == [2, 4, 6]  # the resumed run logged only its own steps
    c.data.name = "shapes_unlabelled_typo"
    with pytest.raises(ValueError, match="shapes_unlabelled_typo"):
        clf.train_classifier(c, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")  # nothing written
