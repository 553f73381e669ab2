"""Evaluation: next-token distributions, target log-probabilities, generation."""

from neuronatlas.evaluate.core import TargetScores, generate, next_token_logprobs, next_token_topk, target_logprobs

__all__ = ["TargetScores", "generate", "next_token_logprobs", "next_token_topk", "target_logprobs"]
