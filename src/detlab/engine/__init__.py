"""Training engine: the loop (``trainer``), one optimiser step (``step``), the data side of a run
(``training_data``), validation, early stopping, the state a run resumes
from (``run_state``), the trainer's hooks (``callbacks``) and the callbacks that write a run's files
(``loggers``)."""
