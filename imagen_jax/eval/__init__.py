"""Evaluation: FID/KID/precision-recall features (NNX InceptionV3), CLIP score (NNX CLIP) and the metrics maths.

Weights are the user's (no package ships them and the machines reach no hub): loaders take local files, and the
tests compare against the reference implementations with seeded random weights.
"""
