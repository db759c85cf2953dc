"""The controllers experiment's configuration checks. The experiment end to end runs in
tests/test_plan_configs.py, on the plan's held-out workloads (ResNet-50, the encoder, the
speech recognizer) on tfds mock data, with the files, methods and report it writes."""

import dataclasses

import pytest

from metaopt.experiments import controllers


def test_bad_config_is_refused():
  config = controllers.quick_config()
  with pytest.raises(ValueError, match="not a multiple of evals=7"):
    dataclasses.replace(config, evals=7)
