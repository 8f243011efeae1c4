"""Errors that the command line turns into a readable message and a non-zero exit."""


class GraftlineError(Exception):
    """Base of errors caused by input (data, params, artifacts), not by a bug."""


class DataError(GraftlineError):
    """A dataset is unreadable or invalid; the message names the file, row or class."""


class TrainingError(GraftlineError):
    """Training cannot go on (for example a non-finite loss)."""


class ArtifactError(GraftlineError):
    """A checkpoint or processed dataset is missing or malformed."""
