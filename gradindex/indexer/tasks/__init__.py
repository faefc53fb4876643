"""Built-in tasks: classifiers over in-memory arrays, the scikit-learn digits demo, and a
Hugging Face causal language model from a local checkpoint (transformers imported lazily)."""

from .causal_lm import CausalLMTask
from .classification import ArrayClassificationTask
from .digits import DigitsTask, load_digits_split, make_digits_model, train_classifier

__all__ = [
    "ArrayClassificationTask",
    "CausalLMTask",
    "DigitsTask",
    "load_digits_split",
    "make_digits_model",
    "train_classifier",
]
