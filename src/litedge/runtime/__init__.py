"""litedge.runtime: the torch-free on-device runtime (numpy, onnxruntime, tokenizers, pillow).

::

    from litedge.runtime import Pipeline, save_png
    pipe = Pipeline.from_bundle("model.litedge", device="auto")
    save_png(pipe("a lighthouse at dusk", seed=0)[0], "lighthouse.png")
"""

from litedge.runtime.image import read_metadata, save_png
from litedge.runtime.pipeline import Pipeline

__all__ = ["Pipeline", "read_metadata", "save_png"]
