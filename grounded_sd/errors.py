"""Typed errors of the controller: callers map them to exit codes and HTTP statuses."""


class GroundedSDError(Exception):
    """Base class of the controller's errors."""


class InvalidLayoutError(GroundedSDError, ValueError):
    """The layout or the requested size cannot be rendered; the message names the problem."""


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
    the prompt's language has no checkpoint. The message names the setting or the language."""


class CheckpointMismatch(ConditioningUnavailable):
    """A conditioning checkpoint does not match the module strictly: a missing, unexpected or
    renamed key, a wrong shape, or a pickle holding more than plain tensors. Names the key."""


class ConnectorError(ConditioningUnavailable, ValueError):
    """A text connector or its training cannot be set up (unknown or unsuitable model, bad
    data, a size the model cannot take); raised before any weights load where possible."""


class NoImageParameters(GroundedSDError):
    """A PNG carries no (or unreadable) generation parameters: not written by this project, or stripped."""
