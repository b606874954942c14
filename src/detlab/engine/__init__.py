"""Training engine: the loop (``trainer``), one optimiser step (``step``), validation, early stopping,
the divergence rollback, and the callbacks that write a run's files."""
