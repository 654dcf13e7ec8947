"""Training machinery shared by the recipes: optimizers, learning-rate schedules, gradient clipping."""
