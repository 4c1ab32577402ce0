"""mlx-kssm: Kuramoto state-space language models in MLX.

The public face: ``build_model(config)`` for any registered architecture (``model_type``),
``load`` / ``save`` for model and run folders, and K-SSM v3's ``Model`` / ``ModelArgs``.
"""

from .io import load, save
from .models import build_model, get_classes
from .models.kssm_v3 import Model, ModelArgs

__all__ = ["Model", "ModelArgs", "build_model", "get_classes", "load", "save"]
__version__ = "0.1.0"
