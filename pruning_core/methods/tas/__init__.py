"""TAS (NeurIPS 2019): a differentiable search of width and depth (``space``), then the found network trained
with KD.

``method`` registers the method (torch); ``options`` is its part of the job spec (torch-free). Nothing is
imported here, so that importing ``options`` loads no torch.
"""
