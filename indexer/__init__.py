"""gradindex's indexer: tasks, gradient capture, compressors, preconditioner and featurize.

The public surface is :data:`__all__`; everything else is internal and may change.
"""

from .compress import (
    COMPRESSORS,
    Compressor,
    DropoutCompressor,
    FactorizedDropoutCompressor,
    GaussianCompressor,
    Layer,
    SjltCompressor,
    describe_layers,
    register_compressor,
)
from .config import CompressionConfig, PreconditionerConfig
from .errors import ConfigError, GradindexError, IndexNotFound, NonFiniteLoss, TaskError
from .evaluate import lds, random_subsets, retrain_losses, topk_overlap
from .exact import ExactInfluence
from .featurize import Block, Featurizer, featurize
from .hooks import LayerCapture
from .influence import InMemoryIndex
from .masks import mask_generator, sample_indices, split_keep
from .precondition import (
    FISHER_KINDS,
    SHAPES,
    FisherAccumulator,
    Preconditioner,
    Shape,
    register_shape,
    self_influence,
)
from .task import Task, TaskSpec, attributed_modules, load_task, task_checkpoints

__version__ = "0.1.0"

__all__ = [
    "COMPRESSORS",
    "FISHER_KINDS",
    "SHAPES",
    "Block",
    "CompressionConfig",
    "Compressor",
    "ConfigError",
    "DropoutCompressor",
    "ExactInfluence",
    "FactorizedDropoutCompressor",
    "Featurizer",
    "FisherAccumulator",
    "GaussianCompressor",
    "GradindexError",
    "InMemoryIndex",
    "IndexNotFound",
    "Layer",
    "LayerCapture",
    "NonFiniteLoss",
    "Preconditioner",
    "PreconditionerConfig",
    "Shape",
    "SjltCompressor",
    "Task",
    "TaskError",
    "TaskSpec",
    "__version__",
    "attributed_modules",
    "describe_layers",
    "featurize",
    "lds",
    "load_task",
    "mask_generator",
    "random_subsets",
    "register_compressor",
    "register_shape",
    "retrain_losses",
    "sample_indices",
    "self_influence",
    "split_keep",
    "task_checkpoints",
    "topk_overlap",
]
