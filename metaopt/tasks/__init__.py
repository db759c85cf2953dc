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
# Importing a modality registers its datasets, models and objectives by name.
from metaopt.tasks import images, resnet, speech, text  # noqa: E402,I001
from metaopt.tasks.bert import Bert, load_bert_safetensors
from metaopt.tasks.images import (IMAGE_SETS, STANDINS, image_batches, load_image_dataset,
                                  load_standin)
from metaopt.tasks.resnet import ResNet, load_weights, save_npz
from metaopt.tasks.speech import (SpeechCTC, load_speech_checkpoint, load_spoken_words,
                                  speech_batches, word_error_rate)
from metaopt.tasks.text import load_text_dataset, load_wordpiece, train_wordpiece

__all__ = [
    "DATASETS", "IMAGE_SHAPES", "Dataset", "load_dataset",
    "MODEL_KINDS", "MLP", "CNN", "Conv4", "make_model",
    "TaskConfig", "Task", "check_task_config", "make_task", "TaskFamily", "task_family",
    "ClassPool", "Episodes", "sinusoid_family", "fewshot_family", "offline_fewshot_splits",
    "mse_loss", "cross_entropy_loss", "classification_metrics", "load_class_pool",
    "load_params", "save_params",
    "images", "resnet", "speech", "text",
    "IMAGE_SETS", "STANDINS", "image_batches", "load_image_dataset", "load_standin",
    "ResNet", "load_weights", "save_npz",
    "Bert", "load_bert_safetensors", "load_text_dataset", "load_wordpiece", "train_wordpiece",
    "SpeechCTC", "load_spoken_words", "speech_batches", "word_error_rate", "load_speech_checkpoint",
]
