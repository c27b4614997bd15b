"""splitlora_mpi: split-federated LoRA fine-tuning of causal LMs over MPI (SplitLoRA)."""

__version__ = "0.1.0"
