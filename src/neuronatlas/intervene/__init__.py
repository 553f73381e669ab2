"""Interventions on neuron sites: ablate, clamp, scale, steer."""

from neuronatlas.intervene.interventions import (
    Ablate, Clamp, Condition, Intervention, Scale, Steer, intervene, normalize_conditions,
)
from neuronatlas.intervene.neurons import NeuronSet

__all__ = ["Ablate", "Clamp", "Condition", "Intervention", "NeuronSet", "Scale", "Steer", "intervene",
           "normalize_conditions"]
