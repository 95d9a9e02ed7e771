"""A loaded graph must be the component the manifest says it is (torch-free).

Hashes prove a file is the one the manifest lists, not that the manifest lists the right
file for each component: two component files swapped (hashes updated to match) load fine
and then fail deep inside onnxruntime. :func:`check_graph_inputs` compares the graph's
input names with the manifest's interface right after loading, one line if they differ.
"""

from __future__ import annotations

from litedge.errors import LitedgeError


def check_graph_inputs(name: str, file: str, declared: dict, session) -> None:
    """Refuse a session (``onnxruntime.InferenceSession``) whose inputs are not the manifest's ``declared`` ones."""
    if not declared:
        return  # an old bundle without input specs
    graph = sorted(i.name for i in session.get_inputs())
    if set(graph) != set(declared):
        raise LitedgeError(f"{name}: {file} takes inputs {graph}, but the manifest declares {sorted(declared)} "
                           "for this component: the component files were swapped or replaced; re-export the bundle")
