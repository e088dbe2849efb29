"""Sample-quality metrics and their feature networks.

``sample_quality``: MMD, sliced Wasserstein, mode fractions, the Fréchet distance;
``classifier``: a small classifier trained on the data for a Fréchet distance on
any labelled image set; ``inception``: InceptionV3 for FID.
"""
