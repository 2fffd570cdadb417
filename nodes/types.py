"""The custom ComfyUI socket types this pack defines, named once."""

ADAFACE = "ADAFACE"
"""A loaded ``AdaFaceBundle`` (face models, Arc2Face encoder, inverter; the teacher UNet on demand)."""

ADAFACE_SUBJECT = "ADAFACE_SUBJECT"
"""An ``adaface_core.subject.SubjectEmbedding``: one identity as subject tokens."""

CATEGORY = "AdaFace"
