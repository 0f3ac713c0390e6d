"""The base of every error a user can cause and fix; its message says what to do."""


class Food101Error(RuntimeError):
    """A problem with the inputs or the environment (not a bug): the message says how to fix it."""


class StageOutputMissing(Food101Error, FileNotFoundError):
    """A file an earlier stage writes is not there: the message names the stage to run."""
