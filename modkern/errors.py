"""The exceptions modkern raises. Each names what is wrong and where (key, model, expected)."""


class ModkernError(Exception):
    """Base class of every error modkern raises on bad input."""


class OptionError(ModkernError, ValueError):
    """An option given a value outside its choices (e.g. precision="fast")."""


class AlphaError(ModkernError, ValueError):
    """An alpha outside [0, 1], or of the wrong kind."""


class KeyMismatchError(ModkernError, KeyError):
    """Keys present in one model only (strict merges)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(ModkernError, ValueError):
    """Two tensors that must have one shape (or one vocabulary width) do not."""


class DTypeError(ModkernError, TypeError):
    """A tensor (or argument) of the wrong kind: its dtype (integer, bool, complex, float8 or
    quantized where floating point is needed), its layout (sparse, nested), no data (meta),
    an in-place target whose elements share memory, a state dict that is not one."""


class NonFiniteError(ModkernError, ValueError):
    """A NaN or infinity where the result would depend on it."""


class BackendError(ModkernError, RuntimeError):
    """A backend was asked for that cannot run these tensors here."""


class CheckpointError(ModkernError, ValueError):
    """A checkpoint folder or file that cannot be read or written as asked."""


class DataError(ModkernError, ValueError):
    """An evaluation or training data file that cannot be read as asked (names file:line
    and the field)."""
