"""The one training loop and what it steps with.

``engine.fit`` trains every phase of every method (methods plug in through its hooks, never a loop of
their own); ``optim`` holds the optimizers per parameter set and the LR rules, ``batches`` which samples
each step sees (a pure function of seed and epoch, so a run resumes exactly), ``evaluation`` the
end-of-epoch views and BatchNorm re-estimation, ``losses`` the KD and KL terms, ``acceleration`` mixed
precision and memory format, ``distributed`` what the ranks of one job exchange.

May import: ``graph`` (MACs of what is trained), ``spec``, ``settings``, ``errors``, ``registry``.
"""
