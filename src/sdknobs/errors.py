"""One exception type for bad user input. The CLI prints its message on one line and exits 2."""


class SdknobsError(ValueError):
    """A problem with what the user asked for (a path, a value, a file's contents).

    The message must say what to fix: name the argument, file or key, and the expected and
    actual value or shape.
    """
