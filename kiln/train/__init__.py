"""The train stage's library: the recipe, the one epoch loop, its checkpoint format, and Ray Train (DDP)."""
