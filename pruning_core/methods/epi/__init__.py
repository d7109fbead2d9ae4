"""EPI (CVPR 2022): prune as soon as the dominant sub-network stabilises.

``method`` registers the method (torch); ``options`` is its part of the job spec (torch-free). Nothing is
imported here, so that importing ``options`` loads no torch.
"""
