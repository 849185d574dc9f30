"""The ``processes`` executor: a coordinator process, forked workers, shared-memory slots."""
