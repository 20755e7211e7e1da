"""Model quality evaluation: sliding-window perplexity (`perplexity`)."""

from jax_infer.eval.perplexity import PerplexityResult, Window, perplexity, sliding_windows

__all__ = ["PerplexityResult", "Window", "perplexity", "sliding_windows"]
