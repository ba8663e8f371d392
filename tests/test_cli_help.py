"""Every command is listed with a description, and every flag documents its default."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from vl2v.cli import app

COMMANDS = {"data", "download", "embed", "serve-teacher", "align", "distill", "train", "run", "results", "eval", "export", "predict", "demo"}
NO_DEFAULT = {"help"}


def test_every_command_listed_with_a_description():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert COMMANDS <= listed


def test_every_flag_documents_its_default():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name != "option" or param.name in NO_DEFAULT or param.required:
                continue
            if param.is_flag and param.secondary_opts == [] and param.default is False:
                continue  # a plain switch: off unless given
            documented = param.show_default or "[default:" in (param.help or "")
            assert documented, f"vl2v {name} {param.opts[0]}: no default in its help"
    help_text = CliRunner().invoke(app, ["align", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[default: 5e-05]" in help_text and "[default: 5001; DomainNet 15001]" in help_text
