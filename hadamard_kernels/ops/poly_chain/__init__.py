from .op import poly_chain

__all__ = ["poly_chain"]
