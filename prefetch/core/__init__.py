"""The process-free core: what every executor and ``workers=0`` share.

``order`` (batch number -> sample indices, on ``permutation``'s seeded bijection), ``rng``
(per-batch seeding), ``pipeline`` (the per-batch work), ``schedule`` (what to make next: the
credit window, slots, redo) and ``reorder`` (results in completion order -> batches in order).
Nothing here starts a process, opens a pipe or maps shared memory.
"""
