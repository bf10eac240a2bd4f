"""The recipe's optimiser, AdaBelief, under a path that MONAI's ``_target_`` resolves on every Python.

``adabelief_pytorch.AdaBelief`` names both the class and the submodule it lives in: from Python 3.12 on,
``pydoc.locate`` (MONAI's resolver) returns the submodule, and the bundles failed in the NGC container with
"module is not an Optimizer".
"""

from adabelief_pytorch.AdaBelief import AdaBelief

__all__ = ["AdaBelief"]
