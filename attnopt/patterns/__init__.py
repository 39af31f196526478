"""attnopt.patterns."""
