"""Turn jsonargparse's nested error reports into the one line a user needs.

jsonargparse explains a bad value by walking every type it tried ("Does not validate
against any of the Union subtypes ... Given value: ..."). The useful part is the
innermost message and the chain of keys leading to it; this module keeps just that.
:class:`RunError` and :func:`storage_error_line` do the same for problems found while a
run starts or trains (an unusable checkpoint, a full or read-only disk).
"""

from __future__ import annotations

import errno
import io
import os
import re

# Lines that describe jsonargparse's search, not the user's mistake.
_NOISE = (
    re.compile(r"^Does not validate against any of the Union subtypes"),
    re.compile(r"^Subtypes:"),
    re.compile(r"^Errors:$"),
    re.compile(r"^- Expected a <class 'NoneType'>"),
    re.compile(r"^Given value type:"),
    re.compile(r"^Given value:"),
    re.compile(r"^- Expected a path but .* either not accessible or invalid"),
    re.compile(r"^- Does not validate against any of the Union subtypes"),
)
# Noise whose more-indented lines (a list of what subclass types accept) are noise too.
_NOISE_BLOCK = re.compile(r"^- Not a valid subclass of ")
_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^(?:- )?Problem with given class_path '([^']+)':\s*(.*)$")
_LITERAL = re.compile(r"Expected a (?:typing\.)?Literal\[(.*)\]\. Got value: (.*)$")
# A key named at the end of a longer line ("... expects a function or a callable class: Parser key "lr":").
_TRAILING_KEY = re.compile(r'Parser key "([^"]+)":\s*$')
# A number was expected; jsonargparse words it "Expected a <class 'float'>" (the value may follow).
_NUMBER = re.compile(r"Expected a <class '(int|float)'>(?:\. Got value: (.*?)(?:\. Got value: .*)?)?$")
_GIVEN = re.compile(r"^Given value: (.*?)(?:\. Got value: .*)?$")
_EXPECTED = {"int": "expected an integer", "float": "expected a number"}


def condense(message: str) -> str:
    """One line from a (possibly multi-line, nested) jsonargparse or instantiation error."""
    keys: list[str] = []
    details: list[str] = []
    class_path, keys_at_class = "", -1
    skip_below: int | None = None  # indentation of a noise line whose sub-lines are noise too
    number: tuple[str, str | None] | None = None  # ("int"|"float", value) of the first "Expected a number"
    given: str | None = None  # the innermost "Given value:"
    for raw in message.splitlines():
        line = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if skip_below is not None and line and indent > skip_below:
            continue
        skip_below = None
        if not line:
            continue
        if _NOISE_BLOCK.match(line):
            skip_below = indent
            continue
        if given is None and (m := _GIVEN.match(line)):
            given = m.group(1)
        if number is None and (m := _NUMBER.search(line)):
            number = (m.group(1), m.group(2))
        if any(p.match(line) for p in _NOISE):
            continue
        if m := _KEY.match(line):
            keys.append(m.group(1))
            line = m.group(2)
        elif m := _CLASS_PATH.match(line):
            class_path, keys_at_class = m.group(1), len(keys)
            line = m.group(2)
        if (m := _TRAILING_KEY.search(line)) and number is None:
            keys.append(m.group(1))
            line = line[: m.start()]
        line = line.removeprefix("- ").strip()
        if line:
            details.append(line)
    if not details:
        return " ".join(message.split())
    detail = details[-1]
    if number is not None and (number[1] or given) is not None:
        # A non-number for a numeric option: jsonargparse's last word is about the other
        # types it tried ("Expected a dot import path string"), which misleads.
        kind, value = number
        detail = f"got {(value or given or '').strip()!r}; {_EXPECTED[kind]}"
    elif m := _LITERAL.search(detail):
        choices = ", ".join(c.strip().strip("'\"") for c in m.group(1).split(","))
        detail = f"got {m.group(2).strip()!r}; accepted: {choices}"
    elif class_path and keys_at_class == len(keys):
        # The class itself could not be used (not a mistake in one of its arguments).
        detail = f"cannot use class_path {class_path!r}: {detail}"
    elif len(details) > 1 and re.match(r"^(in |did not find|line \d)", detail):
        # YAML errors span lines: "while parsing ... in <string>, line 3, column 14".
        detail = " ".join(details)
    prefix = ".".join(keys)
    return f"{prefix}: {detail}" if prefix else detail


def yaml_error(path: str) -> str | None:
    """A one-line description of why the YAML file at ``path`` does not parse, or None."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            yaml.safe_load(f)
    except FileNotFoundError:
        return f"config file {path!r} does not exist"
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        return f"{path}: invalid YAML at {where}: {err.problem or err.context}"
    except yaml.YAMLError as err:
        return f"{path}: invalid YAML: {err}"
    return None


class RunError(Exception):
    """Bad user input, or a run that cannot start or go on for a reason the user can fix.

    The command line shows it as one ``error:`` line (exit code 2) and hides the
    traceback; every other exception is a bug and keeps its traceback. Raised for a bad
    option or config value (converted from jsonargparse and from the constructors'
    ``ValueError`` by the CLI), storage that is read-only or full, a checkpoint that
    cannot be read or resumed, a failed data set download.

    Example::

        raise RunError("cannot write to runs/x: Read-only file system")
    """


class BadFileError(RunError, ValueError):
    """A file the user pointed at exists but is corrupt, truncated or of the wrong kind.

    Also a ``ValueError``, so library callers that catch ``ValueError`` keep working.

    Example::

        raise BadFileError("CIFAR-10 file 'data/cifar-10-batches-py/data_batch_3' is corrupted or truncated")
    """


class MissingFileError(RunError, FileNotFoundError):
    """A file or folder the user pointed at does not exist (also a ``FileNotFoundError``).

    Example::

        raise MissingFileError("CIFAR-10 not found under 'data/cifar-10-batches-py'; set download: true")
    """


# errno values that mean "the storage, not the program, is at fault".
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM})


def storage_error_line(err: BaseException) -> str | None:
    """One line for an ``OSError`` caused by full, read-only or forbidden storage, else None.

    Args:
        err: any exception; only ``OSError`` with a storage errno gives a line.

    Example:
        >>> print(storage_error_line(OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.csv")))
        No space left on device: runs/x/metrics.csv (free space there, or point the run elsewhere with
        --trainer.default_root_dir and the loggers' save_dir)
    """
    if not isinstance(err, OSError) or err.errno not in _STORAGE_ERRNOS:
        return None
    where = err.filename if err.filename is not None else (file_being_written(err) or "(path unknown)")
    reason = err.strerror or os.strerror(err.errno)
    fix = "free space there" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return (
        f"{reason}: {where} ({fix}, or point the run elsewhere with --trainer.default_root_dir and the loggers' "
        "save_dir)"
    )


def file_being_written(err: BaseException) -> str | None:
    """The file a write was going to when ``err`` was raised, found in its traceback, or None.

    A write through a file object (``f.write``, ``f.close``, ``os.fsync``) raises an
    ``OSError`` without a file name; a full disk at start-up (Lightning writing
    ``hparams.yaml``, our ``run.json``) then could not say where. The innermost frame that
    holds a file opened for writing names it.

    Example:
        >>> def write(path):
        ...     with open(path, "w") as f:
        ...         raise OSError(errno.ENOSPC, "No space left on device")  # as f.write would
        >>> try:
        ...     write(os.devnull)
        ... except OSError as e:
        ...     print(file_being_written(e))
        /dev/null
    """
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first: the write that failed
        for value in frame.f_locals.values():
            if (name := _written_file_name(value)) is not None:
                return name
    return None


def _written_file_name(value: object) -> str | None:
    """The path of ``value`` if it is a file object opened for writing (fsspec's ``LocalFileOpener`` too)."""
    if not isinstance(value, io.IOBase):
        return None
    mode = getattr(value, "mode", "")
    if not isinstance(mode, str) or not set(mode) & set("wax+"):
        return None
    for attr in ("path", "name"):  # fsspec keeps the target in .path; open() in .name (an fd number for os.fdopen)
        name = getattr(value, attr, None)
        if isinstance(name, (str, os.PathLike)):
            return os.fspath(name)
    return None
