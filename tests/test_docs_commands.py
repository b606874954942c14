"""The training commands the README and docs/ show compose into a valid config: every group, key and
value they name exists (a user copying one gets a run, not a config error)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from detlab.config import compose_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TRAIN = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:python train\.py|detlab train)\b(.*)$")


def shown_train_commands() -> list[tuple[str, str]]:
    """(page:line, overrides) of every ``python train.py`` / ``detlab train`` command in a code block
    (continuation lines joined, one per ``&&`` part) or in inline code."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        in_block = False
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.lstrip().startswith("```"):
                in_block = not in_block
            elif in_block:
                start = i
                text = line.split("  #")[0].strip()
                while text.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text[:-1] + " " + lines[i].split("  #")[0].strip()
                for part in re.split(r"&&|;|\|", text):
                    match = TRAIN.match(part.strip())
                    if match:
                        found.append((f"{page.relative_to(REPO)}:{start + 1}", match.group(1)))
            else:
                for span in re.findall(r"`([^`]+)`", line):
                    for part in re.split(r"&&|;|\|", span):
                        match = TRAIN.match(part.strip())
                        if match:
                            found.append((f"{page.relative_to(REPO)}:{i + 1}", match.group(1)))
            i += 1
    return found


def composable(arguments: str) -> list[str] | None:
    """The overrides compose_config can take (the first value of a sweep's list; Hydra's own keys and
    run locations left out); None for a line with a placeholder."""
    if "<" in arguments or "..." in arguments:
        return None
    overrides = []
    tokens = iter(shlex.split(arguments))
    for token in tokens:
        if token in ("--cfg", "-c", "--package", "-p"):  # Hydra flags with a value
            next(tokens, None)
            continue
        if token.startswith("-") or token.startswith("hydra") or token.split("=")[0] in ("resume", "run_dir"):
            continue
        key, _, value = token.partition("=")
        if "," in value and not value.startswith("["):  # a -m sweep: a,b,c
            value = value.split(",")[0]
        overrides.append(f"{key}={value}")
    return overrides


COMMANDS = shown_train_commands()


def test_the_pages_show_training_commands():
    assert len(COMMANDS) >= 20
    assert any(where.startswith("README.md") for where, _ in COMMANDS)


@pytest.mark.slow  # one Hydra composition each: about 60 of them
@pytest.mark.parametrize("where, arguments", COMMANDS, ids=[f"{where}" for where, _ in COMMANDS])
def test_a_shown_training_command_composes(where, arguments, monkeypatch, tmp_path):
    overrides = composable(arguments)
    if overrides is None:
        pytest.skip("a placeholder stands in for a path")
    monkeypatch.setenv("DETLAB_DATA", str(tmp_path))  # locations need not exist to compose
    compose_config(overrides=overrides)
