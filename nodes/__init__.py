"""The AdaFace nodes for ComfyUI (V1 node API)."""

from .embed import AdaFaceFaceEmbed
from .export import AdaFaceMixSubjects, AdaFaceSaveEmbedding
from .inject import AdaFaceInjectSubject
from .loader import AdaFaceLoader
from .teacher import AdaFaceTeacherSampler

NODE_CLASS_MAPPINGS = {
    "AdaFaceLoader": AdaFaceLoader,
    "AdaFaceFaceEmbed": AdaFaceFaceEmbed,
    "AdaFaceInjectSubject": AdaFaceInjectSubject,
    "AdaFaceTeacherSampler": AdaFaceTeacherSampler,
    "AdaFaceSaveEmbedding": AdaFaceSaveEmbedding,
    "AdaFaceMixSubjects": AdaFaceMixSubjects,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AdaFaceLoader": "Load AdaFace",
    "AdaFaceFaceEmbed": "Face → ID Embedding",
    "AdaFaceInjectSubject": "Inject Subject Tokens into CLIP conditioning",
    "AdaFaceTeacherSampler": "Arc2Face Teacher Sampler",
    "AdaFaceSaveEmbedding": "Save AdaFace Embedding",
    "AdaFaceMixSubjects": "Mix Subject Embeddings",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
