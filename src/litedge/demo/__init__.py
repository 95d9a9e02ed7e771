"""The demo model: its data, its judge, its build (data and judge are torch-free: numpy + pillow).

``litedge.demo.shapes`` generates the procedural "shapes" text-to-image dataset the demo
teacher and its LiT student are trained on; ``litedge.demo.shapes_eval`` scores generated
images against their captions the way GenEval does (per category, then the mean).
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
"""Where ``python -m litedge.demo.build ship`` puts the trained demo model (package data)."""
DEMO_BUNDLE = MODEL_DIR / "shapes-lit.litedge"
"""The shipped int4 CPU bundle of the LiT student: lit-generate's default ``--bundle``."""
