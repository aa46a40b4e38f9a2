"""t2i-slim: text-to-image serving with a per-request choice of T5 encoder."""
