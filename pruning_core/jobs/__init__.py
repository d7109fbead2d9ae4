"""A job, end to end: the one place where spec, data, model, method, training and artifacts meet.

``runner.run`` validates and assembles a job and runs the method's phases through the one training
loop; ``launch`` runs it as one process per GPU; ``tracking`` and ``progress`` are its reporters
(TensorBoard/MLflow, the terminal). ``python_api`` (``pruning_core.prune``) and ``planning``
(``pruning_core.plan``/``apply``) are the same engine for an in-memory module.

May import every other subpackage; only ``cli`` imports it.
"""
