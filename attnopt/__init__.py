"""attnopt: make attention in PyTorch models fast within an accuracy budget."""
__version__ = "0.1.0"
