"""Interventions on neuron sites: ablate, clamp, scale, steer (neurons or residual-stream vectors)."""

from neuronatlas.intervene.interventions import (
    Ablate, Clamp, Condition, Intervention, Scale, Steer, SteerVector, intervene, normalize_conditions,
)
from neuronatlas.intervene.neurons import NeuronSet
from neuronatlas.intervene.shared import first_intervened_layer, forward_conditions

__all__ = ["Ablate", "Clamp", "Condition", "Intervention", "NeuronSet", "Scale", "Steer", "SteerVector", "intervene",
           "first_intervened_layer", "forward_conditions", "normalize_conditions"]
