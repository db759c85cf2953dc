"""Tasks: offline datasets, small Flax models, and task families that sample them."""

from metaopt.tasks.backbone import load_params, save_params
from metaopt.tasks.data import DATASETS, IMAGE_SHAPES, Dataset, load_dataset
from metaopt.tasks.family import (Task, TaskConfig, TaskFamily, check_task_config, make_task,
                                   task_family)
from metaopt.tasks.fewshot import (ClassPool, Episodes, classification_metrics,
                                   cross_entropy_loss, fewshot_family, mse_loss,
                                   offline_fewshot_splits, sinusoid_family)
from metaopt.tasks.models import CNN, MLP, MODEL_KINDS, Conv4, make_model
from metaopt.tasks.tfds_data import load_class_pool

__all__ = [
    "DATASETS", "IMAGE_SHAPES", "Dataset", "load_dataset",
    "MODEL_KINDS", "MLP", "CNN", "Conv4", "make_model",
    "TaskConfig", "Task", "check_task_config", "make_task", "TaskFamily", "task_family",
    "ClassPool", "Episodes", "sinusoid_family", "fewshot_family", "offline_fewshot_splits",
    "mse_loss", "cross_entropy_loss", "classification_metrics", "load_class_pool",
    "load_params", "save_params",
]
