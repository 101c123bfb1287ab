"""MIM pretraining: masking, the encoder wrapper, heads, targets and losses, recipes, engine."""
