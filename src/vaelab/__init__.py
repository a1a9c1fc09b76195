"""vaelab: variational autoencoders with every term of the objective explicit and checked."""

__version__ = "0.1.0"
