"""Stand-in for ComfyUI's ``node_helpers``: only ``conditioning_set_values``."""

from __future__ import annotations


def conditioning_set_values(conditioning, values={}, append=False):  # noqa: B006 - ComfyUI's signature
    """A copy of each ``[cond, options]`` pair with ``values`` set in the options (the tensors are shared)."""
    out = []
    for cond, options in conditioning:
        options = options.copy()
        for key, value in values.items():
            if append and options.get(key) is not None:
                value = options[key] + value
            options[key] = value
        out.append([cond, options])
    return out
