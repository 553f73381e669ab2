"""Contextual decomposition for transformers (CD-T); see docs/decompose.md."""
from neuronatlas.decompose.core import (LogitTarget, NeuronTarget, Propagation, Source, Target, Trace,
                                        propagate, trace_ids, trace_prompt)

__all__ = ["LogitTarget", "NeuronTarget", "Propagation", "Source", "Target", "Trace", "propagate",
           "trace_ids", "trace_prompt"]
