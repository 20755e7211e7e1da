"""jax_infer: LLM inference on JAX/XLA for TPUs, GPUs and CPUs."""

from jax_infer.config import ModelConfig
from jax_infer.llm import LLM
from jax_infer.outputs import RequestOutput
from jax_infer.sampling import SamplingParams
from jax_infer.tokenizer import Tokenizer

__all__ = ["LLM", "ModelConfig", "RequestOutput", "SamplingParams", "Tokenizer"]
