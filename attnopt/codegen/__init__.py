"""attnopt.codegen."""
