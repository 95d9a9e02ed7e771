"""Restore the demo v2 build's progress into a build folder, in fp32, so its stages continue.

    python -m litedge.demo.build data --workdir work/demo          # first: a stage marks later ones not done
    python demo-progress/v2/restore.py work/demo
    python -m litedge.demo.build teacher --workdir work/demo --init-teacher work/demo/restored-teacher --steps 20000
    python -m litedge.demo.build student --workdir work/demo       # then export, eval, ship

Writes WORK/vae/ and WORK/text/ with their done.json (the autoencoder and the grammar-trained T5
are finished stages) and WORK/restored-teacher/ (the teacher transformer after 6,500 steps).
The weights are stored here in fp16 to keep the repository small.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderDC, PixArtTransformer2DModel
from transformers import T5EncoderModel

here, work = Path(__file__).resolve().parent, Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
AutoencoderDC.from_pretrained(here / "vae", torch_dtype=torch.float32).save_pretrained(work / "vae")
T5EncoderModel.from_pretrained(here / "text" / "text_encoder", torch_dtype=torch.float32).save_pretrained(
    work / "text" / "text_encoder")
shutil.copytree(here / "text" / "tokenizer", work / "text" / "tokenizer", dirs_exist_ok=True)
PixArtTransformer2DModel.from_pretrained(here / "teacher-transformer", torch_dtype=torch.float32).save_pretrained(
    work / "restored-teacher")
for stage in ("vae", "text"):
    done = json.loads((here / "done" / f"{stage}.json").read_text())
    (work / stage / "done.json").write_text(json.dumps({**done, "restored_from": str(here)}, indent=2))
print(f"restored vae, text and the teacher transformer into {work}")
