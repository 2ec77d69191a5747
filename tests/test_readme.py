"""The README's Python examples run as written (those that begin with their imports)."""

from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    blocks = [part.split("```", 1)[0] for part in README.read_text().split("```python")[1:]]
    return [block for block in blocks if block.lstrip().startswith("import")]


@pytest.mark.parametrize("number", range(len(_examples())))
def test_readme_example_runs(number):
    exec(compile(_examples()[number], f"README example {number}", "exec"), {})


def test_the_readme_has_runnable_examples():
    assert len(_examples()) >= 2
