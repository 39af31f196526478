"""attnopt.codegen.cpu."""
