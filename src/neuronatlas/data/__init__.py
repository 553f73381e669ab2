"""Datasets: labelled prompt sets and the built-in data builders."""

from neuronatlas.data.prompts import Prompt, PromptSet, load_prompts

__all__ = ["Prompt", "PromptSet", "load_prompts"]
