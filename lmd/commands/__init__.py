"""One module per group of `lmd` subcommands; each exposes ``register(subparsers)``.

Modules import heavy libraries (torch, diffusers) inside their handlers only, so that
``lmd plan`` starts without waiting for torch.
"""
