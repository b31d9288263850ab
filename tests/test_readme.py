"""The README's two set-up commands are the ones CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = ROOT.joinpath("README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(commands) == 2
    ci_lines = [l for l in ROOT.joinpath(".ci/run").read_text().splitlines() if l and not l.startswith("#")]
    for command in commands:
        assert command.strip() in ci_lines
