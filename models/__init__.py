"""Homogeneous models, margin losses and data sets (docs/math.md section 1)."""

from ._base import AbstractModel as AbstractModel
from ._base import from_spec as from_spec
from ._cnn import CNN as CNN
from ._data import Dataset as Dataset
from ._data import separable_gaussians as separable_gaussians
from ._data import soudry_dataset as soudry_dataset
from ._data import toy_dataset as toy_dataset
from ._linear import DeepLinear as DeepLinear
from ._linear import Linear as Linear
from ._losses import AbstractLoss as AbstractLoss
from ._losses import CrossEntropy as CrossEntropy
from ._losses import Exponential as Exponential
from ._losses import Logistic as Logistic
from ._losses import get_loss as get_loss
from ._mlp import MLP as MLP
from ._objective import Objective as Objective
from ._objective import flatten as flatten
from ._objective import unflatten as unflatten
from ._toy import ToyLeaky as ToyLeaky
