"""Contextual decomposition for transformers (CD-T): every activation split into rel + irrel.

See docs/decompose.md for the rules and invariants; :mod:`neuronatlas.decompose.core` for the engine,
:mod:`~neuronatlas.decompose.attribution` for token and component attributions,
:mod:`~neuronatlas.decompose.circuit` for circuits and their checks by ablation.
"""

from neuronatlas.decompose.attribution import component_attribution, token_attribution
from neuronatlas.decompose.circuit import discover_circuit, fact_rows, faithfulness, validate_neurons
from neuronatlas.decompose.core import (LogitTarget, NeuronTarget, Propagation, Source, Target, Trace,
                                        propagate, trace_ids, trace_prompt)

__all__ = ["LogitTarget", "NeuronTarget", "Propagation", "Source", "Target", "Trace", "propagate",
           "trace_ids", "trace_prompt", "token_attribution", "component_attribution", "discover_circuit",
           "fact_rows", "faithfulness", "validate_neurons"]
