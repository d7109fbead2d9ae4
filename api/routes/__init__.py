"""HTTP routes, one module per resource. Routes stay thin: parse, call store.repo, shape the answer."""
