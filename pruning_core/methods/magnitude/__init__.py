"""``magnitude``: the baseline, one-shot global group-magnitude pruning to the MAC target, then fine-tuning.

``method`` registers the method (torch); ``options`` is its part of the job spec (torch-free). Nothing is
imported here, so that importing ``options`` loads no torch.
"""
