from .op import causal_linear_attention, causal_linear_attention_step

__all__ = ["causal_linear_attention", "causal_linear_attention_step"]
