"""litedge.runtime: the torch-free on-device runtime (numpy, onnxruntime, tokenizers, pillow).

::

    from litedge.runtime import Pipeline, bundle_info, save_png
    pipe = Pipeline.from_bundle("model.litedge", device="auto")
    out = pipe(prompt=["a lighthouse at dusk", "a red fox"], num_inference_steps=20, generator=[0, 1])
    save_png(out.images[0], "lighthouse.png")       # out[0] is the same image
    bundle_info("model.litedge")["memory"]          # what lit-info shows, as a dict
"""

from litedge.runtime.image import read_metadata, save_png
from litedge.runtime.info import bundle_info
from litedge.runtime.pipeline import Pipeline, PipelineOutput

__all__ = ["Pipeline", "PipelineOutput", "bundle_info", "read_metadata", "save_png"]
