"""The LMD benchmark, both levels: ``lmd eval-layouts`` (layouts) and ``lmd eval`` (images).

- ``layouts``: layout-level scoring of planned layouts or raw LLM answers (published rules
  plus stricter checks);
- ``config``: the typed config of one ``lmd eval`` run;
- ``prompts``, ``detection``, ``scoring``, ``runner``: the image-level run (benchmark data,
  OWL-ViT detection, accuracies with confidence intervals, the resumable run directory).

A benchmark concern, not a stage: the stages never import this package. Only
``detection.OwlViTDetector`` and ``runner`` touch torch/transformers, and only when used.
"""
