"""The one exception type users see as a message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: the CLI prints the message and exits with `exit_code`.

    The message must name the file or argument and say what was expected.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
