"""Typed errors of the controller: callers map them to exit codes and HTTP statuses.

Each type means one thing. The caller's inputs: :class:`InvalidRequest` and its kinds (the
layout, the variant name, the size, the options); the loaded model: :class:`ModelLoadError`,
:class:`VariantUnavailable`, :class:`SamCheckpointError`; the run: :class:`GenerationCanceled`,
:class:`NonFiniteLatents`.
"""


class GroundedSDError(Exception):
    """Base class of the controller's errors."""


class InvalidRequest(GroundedSDError, ValueError):
    """A call's inputs cannot be rendered; the subclass says which input, the message what is wrong."""


class InvalidLayoutError(InvalidRequest):
    """The layout cannot be rendered: malformed, or more objects than allowed."""


class UnknownVariant(InvalidRequest):
    """The variant is not one of ``grounded_sd.names.VARIANTS``."""


class InvalidSize(InvalidRequest):
    """Width or height is not a positive multiple of the VAE's downsampling (and of 8)."""


class InvalidOptions(InvalidRequest):
    """The options do not fit the loaded model (attention layers it does not have)."""


class ModelLoadError(GroundedSDError):
    """The diffusion model cannot be loaded (missing directory, missing component, unknown
    scheduler or dtype, a scheduler that takes more than one model call per step)."""


class SamCheckpointError(RuntimeError):
    """A SAM checkpoint cannot be loaded: missing file, unknown model type, or weights of another type."""


class MaskInputError(ValueError):
    """The image or the box given to ``masks.object_mask`` is malformed (a caller bug, not a bad map)."""


class VariantUnavailable(GroundedSDError):
    """The requested variant needs something the loaded model lacks (lmd_plus needs a GLIGEN UNet)."""


class GenerationCanceled(GroundedSDError):
    """``should_cancel()`` returned True; raised within one denoising step or guidance iteration."""


class NonFiniteLatents(GroundedSDError):
    """A pass ended with NaN or infinite latents (fp16 overflow in some models, or broken
    weights); raised instead of decoding a black image. The message names the pass and dtype."""


class ConditioningUnavailable(GroundedSDError):
    """The requested text conditioning cannot be used: its checkpoint or encoder is not
    configured or cannot be read, the UNet is not the kind it was trained for, or (GlueNet)
    the prompt's language has no checkpoint. The message names the setting or the language
    (and may hold a path or a library's text: it is for the operator's log).

    ``public``: a plain sentence a service may show to whoever sent the request, set where
    the cause is the request itself (a language without a checkpoint); None when the cause
    is the operator's configuration, whose details stay in the log."""

    def __init__(self, message: str, *, public: str | None = None):
        super().__init__(message)
        self.public = public


class LanguageUnavailable(ConditioningUnavailable):
    """GlueNet has no checkpoint for the prompt's ``language`` (``configured``: the languages it has)."""

    def __init__(self, message: str, language: str, configured: list[str]):
        super().__init__(message)
        self.language, self.configured = language, configured


class SourcePromptMissing(ConditioningUnavailable):
    """GlueNet denoises with the user's own prompt, and the generation has none (a layout alone)."""


class CheckpointMismatch(ConditioningUnavailable):
    """A conditioning checkpoint does not match the module strictly: a missing, unexpected or
    renamed key, a wrong shape, or a pickle holding more than plain tensors. Names the key."""


class ConnectorError(ConditioningUnavailable, ValueError):
    """A text connector or its training cannot be set up (unknown or unsuitable model, bad
    data, a size the model cannot take); raised before any weights load where possible."""


class NoImageParameters(GroundedSDError):
    """A PNG carries no (or unreadable) generation parameters: not written by this project, or stripped."""
