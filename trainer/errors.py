"""The one exception type a user can cause (bad path, bad config, bad data). `python -m trainer` prints it as a
single `error: ...` line and exits 2 instead of showing a traceback."""


class UserError(ValueError):
    """A problem with the user's input, reported as one clear line."""
