"""densecl-bench: DenseCL pretraining and the classic SSL transfer benchmark suite."""

__version__ = "0.1.0"
