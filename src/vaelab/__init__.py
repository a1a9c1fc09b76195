"""vaelab: variational autoencoders with every term of the objective explicit and checked.

``import vaelab`` is light; the names below load torch on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "VAE": ("vaelab.models", "VAE"),
    "build_model": ("vaelab.models", "build"),
    "Config": ("vaelab.config", "Config"),
    "fit": ("vaelab.training", "fit"),
    "load_model": ("vaelab.checkpoint", "load_model"),
    "elbo": ("vaelab.objectives", "elbo"),
    "given": ("vaelab.contract", "given"),
    "Examples": ("vaelab.contract", "Examples"),
    "ElboTerms": ("vaelab.contract", "ElboTerms"),
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")
