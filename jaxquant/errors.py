"""User-facing errors.

Every error a user can cause (bad recipe, bad checkpoint, bad data, non-finite tensors) is a
``JaxquantError``: the CLI prints its message as one paragraph and exits non-zero, with no stack trace.
Messages name the file / key / layer involved and say what to do.
"""


class JaxquantError(Exception):
    """Base class of every error caused by user input."""


class RecipeError(JaxquantError):
    """A recipe file or quant_cfg is invalid (names the file and the key path)."""


class UnsupportedError(JaxquantError):
    """A format, architecture or option that jaxquant does not implement (yet)."""


class CheckpointError(JaxquantError):
    """A model checkpoint is missing, truncated, or does not match its config."""


class NonFiniteError(JaxquantError):
    """A tensor that is about to be quantized or exported holds NaN or Inf."""


class DataError(JaxquantError):
    """Calibration / evaluation data is missing or unusable."""


class ExportError(JaxquantError):
    """An export target or layout problem."""
