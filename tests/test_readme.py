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


def test_readme_says_how_to_install_on_a_cpu_only_machine():
    text = README.read_text()
    section = text.split("### Installing on a CPU-only machine", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    # the CPU build of torch comes first, then gridgraph
    assert commands.index("pip install torch --index-url https://download.pytorch.org/whl/cpu") < \
        commands.index("pip install -e .")
    assert "| CPU build of torch first" in section and "| plain `pip install -e .` (CUDA build)" in section


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_lead_somewhere():
    text = README.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, f"README link #{target} has no heading"
    for path in re.findall(r"\]\((?!https?:|#)([^)#]+)\)", text):
        assert (README.parent / path).exists(), f"README links to {path}, which does not exist"
