"""`tedepr bench`: side-by-side latency, size and accuracy of compressed vs dense models."""
