"""The AdaFace core: face photo -> ArcFace vector -> Arc2Face ID tokens -> AdaFace subject tokens -> prompt.

Plain torch, no ComfyUI: the ComfyUI nodes (``nodes/``) and the trainer (``trainer/``) both build on it.
Modules are imported on their own (``from adaface_core.pipeline import SubjectEncoder``); this file
imports nothing, so loading one part never pulls in insightface, onnxruntime or diffusers.
"""
