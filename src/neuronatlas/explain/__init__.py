"""Natural-language neuron explanations: exemplars, explain -> simulate -> score, PMI, causal checks.

    >>> from neuronatlas.explain import (ExemplarConfig, collect_exemplars, LocalExplainer, ExplainConfig,
    ...                                  explain_neurons, neuron_card)
    >>> from neuronatlas.data.corpus import default_corpus
    >>> from neuronatlas.intervene import NeuronSet
    >>> collect_exemplars(lm, default_corpus(20), "my-atlas", config=ExemplarConfig(top_k=20))
    >>> explain_neurons("my-atlas", NeuronSet.parse("L1:3"), explainer=LocalExplainer(lm), scorer=lm, subject=lm)
    >>> neuron_card("my-atlas", 1, 3)

Names are imported lazily, so readers such as :mod:`neuronatlas.explain.card` and
:mod:`neuronatlas.explain.tables` (used by ``neuronatlas show`` and viewers) never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CausalResult", "Excerpt", "ExemplarConfig", "ExemplarStream", "ExplainConfig", "ExplainPrompt",
           "ExplainRun", "Explainer", "LocalExplainer", "NeuronExemplars", "NeuronExplanation", "OpenAIExplainer",
           "PMIScore", "Reservoir", "Simulator", "WindowTopK", "causal_effect", "collect_exemplars", "explain_neuron",
           "explain_neurons", "explain_prompt", "neuron_card", "normalise", "pearson", "pmi_rerank", "pmi_scores",
           "read_exemplars", "read_explanations", "stream_exemplars"]

_WHERE = {
    "backends": ("Explainer", "LocalExplainer", "OpenAIExplainer"),
    "card": ("neuron_card",),
    "causal": ("CausalResult", "causal_effect"),
    "exemplars": ("ExemplarConfig", "collect_exemplars", "stream_exemplars"),
    "pipeline": ("ExplainConfig", "ExplainRun", "NeuronExplanation", "explain_neuron", "explain_neurons"),
    "pmi": ("PMIScore", "pmi_rerank", "pmi_scores"),
    "prompts": ("ExplainPrompt", "explain_prompt", "normalise"),
    "simulate": ("Simulator", "pearson"),
    "tables": ("Excerpt", "NeuronExemplars", "read_exemplars", "read_explanations"),
}
_MODULE_OF = {name: f"neuronatlas.explain.{module}" for module, names in _WHERE.items() for name in names}
# the corpus exemplar stream and its statistics live in the recorder package
_MODULE_OF |= {"ExemplarStream": "neuronatlas.record.corpus", "Reservoir": "neuronatlas.record.exemplar_stats",
               "WindowTopK": "neuronatlas.record.exemplar_stats"}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'neuronatlas.explain' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
