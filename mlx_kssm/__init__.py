"""mlx-kssm: Kuramoto state-space language models in MLX."""

from .config import ModelArgs
from .io import load, save
from .models.v3 import Model

__all__ = ["Model", "ModelArgs", "load", "save"]
__version__ = "0.1.0"
