"""Time, measured: what a network costs on a device, and a speed-up turned into a MAC target.

``latency`` times forwards (one model, or a dense and a pruned one alternately), ``layer_times`` where a
network's time goes per layer and the latency-aware weighting of channel scores, ``target`` turns a
requested speed-up into a MAC target before any training.

May import: ``training``, ``artifacts`` (the deployable form is what is timed), ``graph``, ``models``,
``spec``, ``settings``, ``errors``.
"""
