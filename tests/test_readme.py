"""Every Python example in the README runs as written and its assertions hold."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md example {index + 1}", "exec"), {"__name__": "readme_example"})


def test_readme_test_command_is_the_one_ci_runs():
    text = README.read_text()
    block = text.split("<!-- test-command -->", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", block, flags=re.S).group(1).strip()
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert f"TEST_COMMAND='{command}'" in ci and command in ci, "CI must run the README's test command verbatim"
    assert "pytest" in command and command.startswith("python3 -m venv .venv")


def test_readme_example_prints_the_facts(capsys):
    analysis_block = next(b for b in BLOCKS if "receptive_field" in b)
    exec(compile(analysis_block, "README.md analysis example", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.split()
    assert lines[0] == "1" and lines[1] == "49" and lines[2].startswith("0.886")
