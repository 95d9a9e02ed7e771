"""The demo's data and its judge (torch-free: numpy + pillow).

``litedge.demo.shapes`` generates the procedural "shapes" text-to-image dataset the demo
teacher and its LiT student are trained on; ``litedge.demo.shapes_eval`` scores generated
images against their captions the way GenEval does (per category, then the mean).
"""
