"""The exceptions that end a job, by exit code (the CLI maps them; any other error is 1 + abort)."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration, data or arguments: reported as one line, exit code 2."""


class JobFailed(RuntimeError):
    """A failure with a known cause (e.g. a peer that stopped answering): one line from the
    rank that saw it, exit code 1, every rank taken down."""


class CommTimeout(JobFailed):
    """A peer did not answer within comm.timeout_s."""


class Stopped(Exception):
    """A signal asked the job to stop: every rank stopped after the same step and wrote a
    checkpoint of it (exit code 143; the same command resumes)."""

    def __init__(self, step: int):
        super().__init__(f"stopped by a signal after step {step}; a checkpoint of that step was written")
        self.step = step


class Diverged(ConfigError):
    """The training loss is not finite: stop every rank (exit 2) before anything is updated.
    `others_running`: some ranks already went on to the next step (a sequential server had
    answered them); rank 0 then ends the job with an abort (exit 2) instead of waiting for them."""

    def __init__(self, step: int, loss: float):
        super().__init__(
            f"training diverged: the loss is {loss} at step {step}; expected a finite loss "
            "(lower train.lr, or check the data and model.dtype)"
        )
        self.others_running = False


class Evicted(JobFailed):
    """Elastic runs: rank 0 dropped this client (it was silent past elastic.client_timeout_s);
    the client leaves alone (exit 1) and the job goes on without it."""


class TooFewClients(JobFailed):
    """Elastic runs: fewer live clients than elastic.min_clients; a checkpoint of the last step
    was written (exit 1)."""
