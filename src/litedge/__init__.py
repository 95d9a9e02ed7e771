"""litedge: linear diffusion transformers (LiT, EDiT, MM-EDiT) from a PyTorch checkpoint
to images generated offline on a laptop or a phone.

The top-level package is torch-free; ``litedge.models``, ``litedge.export`` and
``litedge.distill`` need the ``export`` / ``distill`` extras (PyTorch).
"""

from litedge.errors import LitedgeError

__version__ = "0.1.0"
__all__ = ["LitedgeError", "__version__"]
