"""README.md against the code it documents: the quantize synopsis lists every option and the default group size."""

from __future__ import annotations

import re
from pathlib import Path

from marlin_cli.commands.quantize import quantize_command
from marlin_cli.settings import DEFAULTS

README = Path(__file__).resolve().parents[1] / "README.md"


def synopsis(command: str) -> str:
    """The ``marlin COMMAND ...`` lines of the README's first code block that starts with them."""
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(f"marlin {command} "):
            return block
    raise AssertionError(f"README.md has no synopsis block for `marlin {command}`")


def test_quantize_synopsis_shows_every_option_and_the_default_group_size() -> None:
    """Issue 17: the synopsis omitted --quiet and showed no default group size (the CLI's is 128)."""
    text = synopsis("quantize")
    options = [o for p in quantize_command.params for o in p.opts if o.startswith("--")]
    missing = [o for o in options if not re.search(re.escape(o) + r"\b", text)]
    assert missing == [], f"README's quantize synopsis lacks {missing}"
    assert "--quiet" in text
    assert re.search(r"--group-size [^\]]*\(default " + str(DEFAULTS.group_size) + r"\)", text), text
