"""Models: loading, architecture specs and sites."""

from neuronatlas.models.loading import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from neuronatlas.models.sites import Component, Site
from neuronatlas.models.specs import SPECS, ArchSpec, spec_for

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model", "wrap_model", "Component", "Site", "SPECS",
           "ArchSpec", "spec_for"]
