"""Model code: backbones, conditioners, pretransforms and the factory that builds them from a config."""

from pipeline.models.factory import create_model_from_config

__all__ = ["create_model_from_config"]
