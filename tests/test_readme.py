"""The README's test command is what CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Tests \(.*?\n```bash\n(.+?)\n```", readme, re.S)
    assert block, "README lost its test command"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert block.group(1).strip() in [line.strip() for line in ci_lines]
