"""The coarse grain: tensor-train / tensor-ring layers, their initialization and planner."""
