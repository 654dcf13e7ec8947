"""Recipes: each a plain `main(args)` that reads like the paper's algorithm."""
