"""gradindex's indexer: tasks, gradient capture, compressors, preconditioner and featurize.

The public surface is :data:`__all__`; everything else is internal and may change.
"""

from .compress import COMPRESSORS, Compressor, Layer, register_compressor
from .config import CompressionConfig, PreconditionerConfig
from .errors import ConfigError, GradindexError, IndexNotFound, NonFiniteLoss, TaskError
from .evaluate import lds, random_subsets, retrain_losses, topk_overlap
from .exact import ExactInfluence
from .featurize import Block, Featurizer, featurize
from .hooks import LayerCapture
from .influence import InMemoryIndex
from .precondition import (
    FISHER_KINDS,
    SHAPES,
    FisherAccumulator,
    Preconditioner,
    register_shape,
    self_influence,
)
from .task import Task, TaskSpec, load_task

__version__ = "0.1.0"

__all__ = [
    "COMPRESSORS",
    "FISHER_KINDS",
    "SHAPES",
    "Block",
    "CompressionConfig",
    "Compressor",
    "ConfigError",
    "ExactInfluence",
    "Featurizer",
    "FisherAccumulator",
    "GradindexError",
    "InMemoryIndex",
    "IndexNotFound",
    "Layer",
    "LayerCapture",
    "NonFiniteLoss",
    "Preconditioner",
    "PreconditionerConfig",
    "Task",
    "TaskError",
    "TaskSpec",
    "__version__",
    "featurize",
    "lds",
    "load_task",
    "random_subsets",
    "register_compressor",
    "register_shape",
    "retrain_losses",
    "self_influence",
    "topk_overlap",
]
