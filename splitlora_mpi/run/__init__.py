"""Running a job: the runner that wires a rank (the same for every mode), the handshake,
checkpoints, the run log and the output files."""
