"""The top layer: the ``lmd`` command line, the one settings object, and the wiring between them and the stages.

- ``settings``: every knob (``LMD_*`` environment variables, ``.env``), read by the CLI, the
  API and the workers alike;
- ``wiring``: settings in, objects out (the LLM config and planner, the pipeline, the options
  of a preset), so every process builds the stages the same way;
- ``cli`` and ``commands/``: ``lmd plan|generate|serve|worker|bench|eval|eval-layouts``;
- ``bench`` and ``evaluation/``: what ``lmd bench`` measures and the LMD benchmark at layout and
  image level.

The stages (``layout_planner``, ``grounded_sd``) never import this package.
"""
