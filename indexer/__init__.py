"""gradindex's indexer: tasks, gradient capture, compressors, preconditioner and featurize.

The public surface is :data:`__all__`; everything else is internal and may change.
"""

from .build import (
    BuildConfig,
    build,
    delete_index,
    example_metadata,
    finalize,
    index_info,
    list_indexes,
    parse_shard,
    refinalize,
    shard_from_env,
    stage,
)
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
from .demo import prepare_demo
from .errors import (
    ConfigError,
    ExampleNotFound,
    GradindexError,
    IndexNotFound,
    NonFiniteLoss,
    StorageError,
    TaskError,
)
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
from .reader import Hit, Index, check_index, open_index
from .settings import Settings
from .staging import ChunkWriter, StagedWindow, Staging
from .store import FaissConfig, load_manifest, save_manifest
from .task import Task, TaskSpec, attributed_modules, load_task, task_checkpoints

__version__ = "0.1.0"

__all__ = [
    "COMPRESSORS",
    "FISHER_KINDS",
    "SHAPES",
    "Block",
    "BuildConfig",
    "ChunkWriter",
    "CompressionConfig",
    "Compressor",
    "ConfigError",
    "DropoutCompressor",
    "ExactInfluence",
    "ExampleNotFound",
    "FactorizedDropoutCompressor",
    "FaissConfig",
    "Featurizer",
    "FisherAccumulator",
    "GaussianCompressor",
    "GradindexError",
    "Hit",
    "InMemoryIndex",
    "Index",
    "IndexNotFound",
    "Layer",
    "LayerCapture",
    "NonFiniteLoss",
    "Preconditioner",
    "PreconditionerConfig",
    "Settings",
    "Shape",
    "SjltCompressor",
    "StagedWindow",
    "Staging",
    "StorageError",
    "Task",
    "TaskError",
    "TaskSpec",
    "__version__",
    "attributed_modules",
    "build",
    "check_index",
    "delete_index",
    "describe_layers",
    "example_metadata",
    "featurize",
    "prepare_demo",
    "finalize",
    "index_info",
    "lds",
    "list_indexes",
    "load_manifest",
    "load_task",
    "mask_generator",
    "open_index",
    "parse_shard",
    "random_subsets",
    "refinalize",
    "register_compressor",
    "register_shape",
    "retrain_losses",
    "sample_indices",
    "save_manifest",
    "self_influence",
    "shard_from_env",
    "split_keep",
    "stage",
    "task_checkpoints",
    "topk_overlap",
]
