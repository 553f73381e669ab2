"""One error hierarchy for NeuronAtlas.

Every error a user can cause derives from :class:`NeuronAtlasError`; its message names the bad value
and the fix, on one line. The CLI prints it in red and exits with code 2.

    >>> from neuronatlas.errors import SiteError
    >>> raise SiteError("site 'attn' is not available for llama; choose from: mlp, gate")
    Traceback (most recent call last):
    neuronatlas.errors.SiteError: site 'attn' is not available for llama; choose from: mlp, gate
"""

from __future__ import annotations

__all__ = [
    "NeuronAtlasError",
    "UnsupportedModelError",
    "ModelLoadError",
    "DeviceError",
    "DatasetError",
    "SiteError",
    "SelectionError",
    "AtlasError",
    "InterventionError",
    "ExplainerError",
]


class NeuronAtlasError(Exception):
    """Base class of every error NeuronAtlas raises on bad input or state."""


class UnsupportedModelError(NeuronAtlasError):
    """The model's ``config.model_type`` has no architecture spec."""


class ModelLoadError(NeuronAtlasError):
    """A ``--model`` value could not be resolved or loaded."""


class DeviceError(NeuronAtlasError):
    """A ``--device`` that is unknown or not available on this machine."""


class DatasetError(NeuronAtlasError):
    """A dataset file is missing or malformed; the message names file, line and field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            if field is not None:
                where += f" (field {field!r})"
            where += ": "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class SiteError(NeuronAtlasError):
    """A site (layer, component) that the model does not have."""


class SelectionError(NeuronAtlasError):
    """A neuron selector that cannot be parsed or points outside the model."""


class AtlasError(NeuronAtlasError):
    """An atlas directory is missing, incomplete or of another schema version."""


class InterventionError(NeuronAtlasError):
    """An intervention that cannot be applied (bad values, shapes, missing statistics)."""


class ExplainerError(NeuronAtlasError):
    """An explainer backend failed (unreachable endpoint, bad reply)."""
