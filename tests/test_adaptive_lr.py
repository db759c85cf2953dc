"""The training loop's validation feed and early stopping, and the adaptive-lr experiment."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaopt import cli
from metaopt.experiments import adaptive_lr
from metaopt.schedules.plateau import early_stopping, plateau_lr
from metaopt.tasks import TaskConfig, make_task
from metaopt.train import steps_per_epoch, train_grid

TASK = make_task(TaskConfig("iris", "mlp", 8, 1, 16, 40, 0))
KEYS = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))


def plateau_tx(_):
  # rtol=0.5: only a halving of the val loss counts, so the plateau comes fast.
  return optax.chain(optax.scale_by_adam(),
                     plateau_lr(1e-2, patience=1, rtol=0.5, min_lr=1e-6,
                                early_stopping_patience=3))


def test_steps_per_epoch_is_ceil_of_train_size_over_batch():
  assert TASK.data.x_train.shape[0] == 90
  assert steps_per_epoch(TASK) == 6  # ceil(90 / 16)


@pytest.fixture(scope="module")
def plateau_run():
  res, _ = train_grid(TASK, plateau_tx, jnp.zeros(2), KEYS, steps=40, eval_every=5,
                      feed_val_loss=True)
  return res


def test_plateau_reduces_and_stops_at_the_evaluations_the_loop_feeds(plateau_run):
  res = plateau_run
  for run in range(2):
    # Evaluation k (at step 5k) is read by the step with index 5k: the LR of steps
    # 5k.. follows the rule applied to evaluations 1..k (the initial one is not counted).
    val, expected = res.val_loss[run], np.full(40, 1e-2)
    best, since, lr, stop = np.inf, 0, 1e-2, None
    for k in range(1, 8):
      improved = val[k] < 0.5 * best
      best, since = (val[k], 0) if improved else (best, since + 1)
      lr = lr if improved else max(lr * 0.1, 1e-6)
      expected[5 * k:] = lr
      if since >= 3:
        stop = 5 * k
        break
    assert stop is not None and res.stopped_at[run] == stop
    np.testing.assert_allclose(res.learning_rate[run], expected, rtol=1e-5)
    assert res.learning_rate[run][9] == pytest.approx(1e-2)  # nothing moves between evaluations


def test_early_stopping_freezes_the_run_and_records_the_step(plateau_run):
  res = plateau_run
  for run in range(2):
    stop = int(res.stopped_at[run])
    assert 0 < stop < 40 and stop % 5 == 0
    k = stop // 5
    # Parameters never change after the stop: every later evaluation is identical.
    for field in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
      curve = getattr(res, field)[run]
      np.testing.assert_array_equal(curve[k:], curve[k])
    assert not np.allclose(res.val_loss[run][k - 1], res.val_loss[run][k])
    # No training step from the stop on: NaN loss, the LR held.
    assert np.all(np.isfinite(res.train_loss[run][:stop]))
    assert np.all(np.isnan(res.train_loss[run][stop:]))
    np.testing.assert_array_equal(res.learning_rate[run][stop:], res.learning_rate[run][stop])


def test_early_stopping_without_a_validation_loss_says_so_instead_of_never_stopping():
  make_tx = lambda lr: optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=lr),
                                   early_stopping(2, rtol=0.5))
  lrs = jnp.full(2, 1e-2)
  fed, _ = train_grid(TASK, make_tx, lrs, KEYS, steps=40, eval_every=5, feed_val_loss=True)
  plain = lambda lr: optax.inject_hyperparams(optax.adam)(learning_rate=lr)
  alone, _ = train_grid(TASK, plain, lrs, KEYS, steps=40, eval_every=5)
  assert np.all(fed.stopped_at < 40)
  # Until the stop, the two runs are the same: early_stopping leaves updates alone.
  stop = int(fed.stopped_at.min())
  np.testing.assert_allclose(fed.train_loss[:, :stop], alone.train_loss[:, :stop], rtol=1e-5)
  with pytest.raises(ValueError, match="early_stopping needs the validation loss.*feed_val_loss"):
    train_grid(TASK, make_tx, lrs, KEYS, steps=40, eval_every=5)


QUICK = adaptive_lr.quick_config


WORKLOAD = adaptive_lr.Workload("wine", "mlp", 4, 2, 16, 3)  # its own size, batch and epochs


def tiny_quick(seed=0):
  return dataclasses.replace(QUICK(seed), datasets=("iris",), width=8,
                             depth=1, epochs=2, tune_lrs=(1e-3, 1e-2),
                             include_pretrained=False,  # pretrained_lr is tested elsewhere
                             self_tuning=("dog",), workloads=(WORKLOAD,))


def test_cli_adaptive_lr_quick_writes_report_results_and_plots(tmp_path, monkeypatch):
  monkeypatch.setattr(adaptive_lr, "quick_config", tiny_quick)
  args = ["run", "adaptive-lr", "--quick", "--out", str(tmp_path), "--no-progress"]
  assert cli.main(args) == 0
  out = tmp_path / "adaptive-lr-quick"
  for name in ("report.md", "results.json", "lr.png", "val_loss.png"):
    assert (out / name).stat().st_size > 0, name
  results = json.loads((out / "results.json").read_text())
  methods = {r["method"] for r in results["rows"]}
  assert set(adaptive_lr.LABELS.values()) - {"learned (shipped)"} - set(
      adaptive_lr.SELF_TUNING_LABELS.values()) | {"DoG"} <= methods
  for row in results["rows"]:
    assert 0.0 <= row["test acc"] <= 1.0
  curves = results["curves"]["iris"]
  assert all(len(c["learning_rate"][0]) == 2 * 3 for c in curves.values())  # 2 epochs of 3
  # The workload trains with its own model, batch and epochs: 3 epochs of ceil(106 / 16).
  assert {r["task"] for r in results["rows"]} == {"iris", "wine-mlp-4x2"}
  curves = results["curves"]["wine-mlp-4x2"]
  assert all(len(c["learning_rate"][0]) == 3 * 7 for c in curves.values())
  assert all(c["eval_steps"][0] == [0, 7, 14, 21] for c in curves.values())  # once an epoch
  assert "wine-mlp-4x2 (batch 16, up to 3 epochs)" in (out / "report.md").read_text()
  target = results["quality_target"]["iris"]
  assert set(target["starts"]) == {"10x", "0.1x"}
  report = (out / "report.md").read_text()
  assert "| task | method | test acc" in report and "Quality target" in report


def test_adaptive_lr_rejects_lr_schedule_only_options(capsys, tmp_path):
  assert cli.main(["run", "adaptive-lr", "--quick", "--out", str(tmp_path),
                   "--set", "meta.meta_steps=3"]) == 2
  assert "unknown config field 'meta'" in capsys.readouterr().err
  assert cli.main(["run", "adaptive-lr", "--quick", "--out", str(tmp_path),
                   "--save-controller", str(tmp_path / "c")]) == 2
  assert "experiment 'adaptive-lr' has no config field 'save_controller'" in \
      capsys.readouterr().err
  assert not any(tmp_path.iterdir())  # no run folder for a failed start


def test_adaptive_lr_config_refuses_bad_workloads():
  base = adaptive_lr.quick_config()
  with pytest.raises(ValueError, match="unknown workload model 'resnet'; accepted: .*resnet18"):
    dataclasses.replace(base, workloads=(WORKLOAD._replace(model="resnet"),))
  with pytest.raises(ValueError, match="workload epochs must be an integer >= 1, got 0"):
    dataclasses.replace(base, workloads=(WORKLOAD._replace(epochs=0),))
  with pytest.raises(ValueError, match="task 'wine-mlp-4x2' appears twice"):
    dataclasses.replace(base, workloads=(WORKLOAD, WORKLOAD))
  with pytest.raises(ValueError, match="datasets and workloads are both empty"):
    dataclasses.replace(base, datasets=(), workloads=())
  # The default runs the offline stand-ins of the plans' workloads after the datasets.
  names = list(adaptive_lr.tasks(adaptive_lr.default_config()))
  assert names[-3:] == ["mnist5k_28-resnet18-4x2", "sentiment_synth-bert-32x2",
                        "spoken_words-speech_ctc-64x1"]
