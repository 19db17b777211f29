"""Evaluation with lm-evaluation-harness: the llmpipe model adapter, local tasks, decontamination, the evaluate stage."""
