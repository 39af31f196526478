"""attnopt.codegen.triton."""
