"""The image-level LMD benchmark (``lmd eval``): detection, scoring with confidence intervals, the run.

A benchmark concern, not a stage: the stages never import this package. Only
``detection.OwlViTDetector`` and ``runner`` touch torch/transformers, and only when used.
"""
