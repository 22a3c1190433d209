from .op import poly_sa, poly_sa_pool

__all__ = ["poly_sa", "poly_sa_pool"]
