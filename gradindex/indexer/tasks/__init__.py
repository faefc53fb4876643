"""Built-in tasks: classifiers over in-memory arrays, and the scikit-learn digits demo."""

from .classification import ArrayClassificationTask
from .digits import DigitsTask, load_digits_split, make_digits_model, train_classifier

__all__ = [
    "ArrayClassificationTask",
    "DigitsTask",
    "load_digits_split",
    "make_digits_model",
    "train_classifier",
]
