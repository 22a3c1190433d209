"""Op families. Each sub-package registers its torch.library custom ops on import."""
