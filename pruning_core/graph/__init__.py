"""The network as channel groups: what can be removed, what it costs, and the removal itself.

``groups`` finds the coupled channel groups (Torch-Pruning's DependencyGraph) and predicts MACs from
keep counts, ``macs`` is the one MAC and params counter, ``importance`` scores channels per group,
``budget`` turns scores or ratios into keep decisions that meet a MAC budget (the one allocator, the
width floor, the target band), ``masks`` and ``filters`` prune softly beside the model, ``surgery``
removes channels physically and describes/rebuilds a pruned architecture, ``blocks`` removes whole
residual blocks (depth).

May import: ``models`` (to rebuild a described architecture), ``spec``, ``settings``, ``errors``,
``registry``. Nothing about training, methods or jobs.
"""
