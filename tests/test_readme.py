"""The README's quickstart commands are the ones CI runs (no drift between docs and CI)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current).strip())
        elif inside:
            current.append(line)
    return blocks


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_commands = [b for b in blocks if "pytest tests" in b]
    assert len(test_commands) == 1, "the README must give exactly one test command"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_commands[0] in ci_lines


def test_readme_main_command_installs_torch_only_when_missing():
    main = [b for b in _bash_blocks((ROOT / "README.md").read_text()) if "fastpo verify" in b]
    assert main and main[0].startswith("(python -c 'import torch' 2>/dev/null || pip install torch==2.13.0)")
