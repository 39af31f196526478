"""attnopt.rewriter."""
