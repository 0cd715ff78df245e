"""SPARC: concept-aligned sparse autoencoders across models and modalities."""

__version__ = "0.1.0"
