from .context_parallel import context_parallel_linear_attention
from .op import causal_linear_attention, causal_linear_attention_step

__all__ = ["causal_linear_attention", "causal_linear_attention_step", "context_parallel_linear_attention"]
