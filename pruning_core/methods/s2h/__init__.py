"""S2H (S2HPruner, NeurIPS 2024): soft and hard networks trained together, decoupled distillation, one stage.

``method`` registers the method (torch); ``options`` is its part of the job spec (torch-free). Nothing is
imported here, so that importing ``options`` loads no torch.
"""
