"""The miniature world: procedurally drawn, captioned 32x32 scenes with exact ground truth, and an exact evaluator.

Small enough to train a FLUX-architecture text-to-image model on a laptop CPU, rich enough to have the paper's three
criteria in miniature: image quality (clean shapes), semantics (colour, shape, size, position, count, relations) and
text rendering (short words on a sign).
"""
