"""Headless AdaFace trainer: stage 1 (face distillation) and stage 2 (composition distillation).

Entry point: ``python trainer/run.py --config FILE.yaml`` (or ``--preset smoke``).
"""
