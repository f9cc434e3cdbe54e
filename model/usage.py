"""The one error type of the command line, shared by both halves of ``softvq``.

It lives in ``model/`` (the lower layer) so that the training commands in ``model.training.cli``
can raise it without importing from ``service/``; ``service.cli`` catches it for every
subcommand and prints it as one line with exit status 2.
"""


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""
