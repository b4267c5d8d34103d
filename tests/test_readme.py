"""The README's two commands and .ci/run must agree, so CI proves what a newcomer runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks if "pip install" in b]


def test_readme_has_a_demo_and_a_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("kompakt demo")
    assert commands[1].endswith("python -m pytest -q")
    for command in commands:
        assert "-c constraints.txt" in command  # torch pinned on a fresh machine


def test_ci_runs_the_readme_test_command():
    ci_steps = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert " && ".join(ci_steps) == readme_commands()[1]


def test_constraints_pin_torch():
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()
