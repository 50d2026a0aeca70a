"""The one error type of :mod:`ssiu_arch.evaluation`."""


class ResultsError(ValueError):
    """A results, bench, dataset or image file that cannot be used; the message names it."""
