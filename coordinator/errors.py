"""Errors shared across the coordinator's commands."""


class UserError(Exception):
    """An error the user can act on: printed without a traceback, exit status 2."""
