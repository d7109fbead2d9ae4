"""PSAP (arXiv 2303.11881): iterative soft prune-train, sparsity-adapted ratios, gradient protection,
reconstruction.

``method`` registers the method (torch); ``options`` is its part of the job spec (torch-free). Nothing is
imported here, so that importing ``options`` loads no torch.
"""
