"""attnopt.cost_model."""
