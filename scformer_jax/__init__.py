"""scformer-jax: the scFormer perturbation-prediction model in JAX/Flax."""

from scformer_jax.batch import PerturbBatch
from scformer_jax.config import Config, ModelConfig, ObjectiveConfig, load_config
from scformer_jax.model import TransformerGenerator, init_params

__all__ = [
    "Config",
    "ModelConfig",
    "ObjectiveConfig",
    "PerturbBatch",
    "TransformerGenerator",
    "init_params",
    "load_config",
]
__version__ = "0.1.0"
