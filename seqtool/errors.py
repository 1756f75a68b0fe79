"""The seqtool error family.

Every error a user can cause is a ``SeqtoolError`` with a one-line message that says what to do.
The CLI prints ``error: <message>`` and exits with ``exit_code`` (2 for bad input, 1 for failures);
``SEQTOOL_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations


class SeqtoolError(Exception):
    """A failure seqtool understands; ``exit_code`` 1 unless a subclass says otherwise."""

    exit_code = 1


class BadInputError(SeqtoolError):
    """The user's input is wrong (path, option value, shape, dtype ...): exit code 2."""

    exit_code = 2


class UnsupportedModelError(BadInputError):
    """The checkpoint's model family (or format) is not supported."""


class OutputExistsError(BadInputError):
    """The output path exists and neither ``--force`` nor ``--in-place`` was given."""


class DeviceError(BadInputError):
    """A device was requested that this machine does not have (e.g. ``cuda`` without a GPU)."""


class ShapeError(BadInputError):
    """Tensors passed to a kernel op have incompatible shapes, dtypes or devices."""


class NotImplementedMethodError(SeqtoolError):
    """A method or option that seqtool names but does not implement (yet)."""
