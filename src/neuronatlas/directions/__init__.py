"""Directions in residual-stream spaces: capture, fit (difference of means, PCA, logistic probe)
with held-out accuracy, save/load, and steering through :class:`~neuronatlas.intervene.SteerVector`.
See docs/directions.md."""

from neuronatlas.directions.capture import Pool, capture
from neuronatlas.directions.fit import METHODS, DirectionSet, Method, fit_direction, fit_one_vs_rest, load_directions
from neuronatlas.directions.spaces import Space, stream_hooks
from neuronatlas.directions.sweep import (
    SweepCell, SweepResult, continuation_perplexity, plot_sweep, probe_scorer, steering_sweep,
)
from neuronatlas.intervene.interventions import SteerVector

__all__ = ["Space", "Pool", "Method", "METHODS", "capture", "stream_hooks", "fit_direction", "fit_one_vs_rest",
           "DirectionSet", "load_directions", "SteerVector", "steering_sweep", "probe_scorer",
           "continuation_perplexity", "plot_sweep", "SweepCell", "SweepResult"]
