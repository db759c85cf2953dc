"""Tasks: offline datasets, small Flax models, and task families that sample them."""

from metaopt.tasks.data import DATASETS, Dataset, load_dataset
from metaopt.tasks.family import Task, TaskConfig, TaskFamily, make_task, task_family
from metaopt.tasks.models import CNN, MLP, make_model
from metaopt.tasks.backbone import load_params, save_params
from metaopt.tasks.tfds_data import ClassPool, load_class_pool

__all__ = [
    "DATASETS",
    "Dataset",
    "load_dataset",
    "MLP",
    "CNN",
    "make_model",
    "TaskConfig",
    "Task",
    "make_task",
    "TaskFamily",
    "task_family",
    "ClassPool",
    "load_class_pool",
    "load_params",
    "save_params",
]
