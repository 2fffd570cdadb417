"""Stand-in for ComfyUI's ``latent_preview``: ``prepare_callback``, the callback KSampler hands its sampler.

As in ComfyUI it owns a ``comfy.utils.ProgressBar`` and updates it once per step; the real one also
decodes a preview image (None here: no previewer), and the server's progress hook raises on interrupt.
"""

from __future__ import annotations

import comfy.utils


def prepare_callback(model, steps, x0_output_dict=None):
    progress = comfy.utils.ProgressBar(steps)

    def callback(step, x0, x, total_steps):
        if x0_output_dict is not None:
            x0_output_dict["x0"] = x0
        progress.update_absolute(step + 1, total_steps, None)

    return callback
