"""The process-free core: the per-batch work every executor and ``workers=0`` share.

``config`` (the option list, one validated configuration), ``order`` (batch number -> sample
indices, on ``permutation``'s seeded bijection), ``rng`` (per-batch seeding), ``pipeline``
(``make_numbered_batch``: the executor contract, and the batch pipeline), ``collate``, ``aliasing``
(``workers=0``'s copies), ``tensors`` (torch and JAX leaves), ``structure`` (the one walker over
nested batches), ``schedule`` (what to make next: credits, places, redo, give-ups) and ``reorder``
(completion order -> batch order, leases). Nothing here starts a process, opens a pipe or maps
shared memory, and nothing here imports the rest of the package but ``errors``
(``tests/unit/test_design_rules.py``). See ``docs/design.md`` ("The layout").
"""
