"""What the engine reads: one stdout line and the exit code.

ovirt-engine's CinderlibExecutor merges stderr into stdout and takes the
*first* line starting with ``error`` or with the correlation id, then
checks the exit code (0 = success)::

    success with a result   <correlation_id>:<payload>\n       exit 0
    success, nothing to say                                    exit 0
    already removed         error:Volume <id> not found\n      exit 0
    failure                 error:<one line, secrets hidden>\n exit 1
    bad command line        error:<what is wrong>\n            exit 2

An ``Outcome`` is those bytes and that code, made by the runner (in the
command or in a warm child) and printed by the command, so that both ways
print the same.  This module imports nothing heavy: the command loads it
even when the warm service does the work.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class Outcome:
    """What to print on stdout, and the exit code."""

    def __init__(self, output=b"", exit_code=EXIT_OK):
        self.output = output
        self.exit_code = exit_code

    def to_dict(self):
        return {"output": self.output.decode("utf-8"),
                "exit_code": self.exit_code}

    @classmethod
    def from_dict(cls, d):
        return cls(d["output"].encode("utf-8"), int(d["exit_code"]))

    def __repr__(self):
        return "Outcome(exit_code={}, {} bytes)".format(self.exit_code,
                                                        len(self.output))


def error(text, exit_code=EXIT_FAILED):
    """An ``error:`` outcome; ``text`` is flattened to one line."""
    line = " ".join(str(text).split())
    return Outcome("error:{}\n".format(line).encode("utf-8"), exit_code)


def result(correlation_id, payload):
    """The success line the engine reads ``payload`` from.

    ManagedBlockExecutor looks for ``error`` *before* the correlation id
    and returns what follows the 6 characters ``error:``.  With an id that
    starts with ``error`` (the engine takes ids from its API callers), the
    line ``<id>:<payload>`` would be read as an error with a mangled
    payload, so the line is ``error:<payload>``: what the engine extracts
    is the payload, and exit code 0 still says success.
    """
    prefix = "error" if correlation_id.startswith("error") else \
        correlation_id
    return Outcome("{}:{}\n".format(prefix, payload).encode("utf-8"))
