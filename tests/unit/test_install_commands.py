"""The documented commands install into a virtual environment, never into the system's Python.

Debian's own python3 refuses `pip install` outside a virtual environment (PEP 668,
`error: externally-managed-environment`), and installing into whatever Python comes first on
PATH replaces a user's own install. So in the README's "Run it" and "Tests" commands, the
scripts they run (tests/run, scripts/venv, benchmarks/run) and the systemd unit's install
steps, every `pip install` must be a virtual environment's pip, that environment made by
`python -m venv` in the same place, and the README's program run from that environment.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPTS = ("tests/run", "scripts/venv", "benchmarks/run")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
PREFIXES = {"exec", "sudo", "env", "command", "!", "if", "elif", "then", "else", "do", "while"}


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell text (one level: enough for these scripts): lines joined
    at a trailing backslash, comments dropped, variables assigned as `name=value` substituted,
    split at `&&`, `||`, `;` and `|`; words that only lead into a command (`exec`, `sudo`,
    `if !`, `NAME=value ...`) dropped."""
    text = re.sub(r"\\\n", " ", script)
    assigned: dict[str, str] = {}
    result: list[list[str]] = []
    for line in text.splitlines():
        words: list[str] = []
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        for token in lexer:
            if token in SEPARATORS:
                result.append(words)
                words = []
                continue
            for name, value in assigned.items():
                token = token.replace(f"${{{name}}}", value).replace(f"${name}", value)
            token = token.replace("$PWD/", "")
            words.append(token)
        result.append(words)
        if len(words) == 1 and (m := re.fullmatch(r"([A-Za-z_]\w*)=(\S+)", words[0])):
            assigned[m[1]] = m[2]
    stripped = []
    for c in result:
        while len(c) > 1 and (c[0] in PREFIXES or re.fullmatch(r"[A-Za-z_]\w*=\S*", c[0])):
            c = c[1:]
        if c:
            stripped.append(c)
    return stripped


def venvs_made(cmds: list[list[str]]) -> set[str]:
    """Directories made by `python... -m venv DIR`, and `.venv` by `bash scripts/venv`
    (which the test below holds to the same rule)."""
    made = set()
    for c in cmds:
        if len(c) >= 4 and Path(c[0]).name.startswith("python") and c[1:3] == ["-m", "venv"]:
            made.add(c[-1].rstrip("/"))
        if c[:2] == ["bash", "scripts/venv"]:
            made.add(".venv")
    return made


def problems(script: str) -> list[str]:
    """Each `pip install` that is not a virtual environment's (made in the same text)."""
    cmds = commands(script)
    venvs = venvs_made(cmds)
    found = []
    for c in cmds:
        program = Path(c[0]).name
        if program.startswith("pip"):
            args = c[1:]
        elif program.startswith("python") and c[1:3] == ["-m", "pip"]:
            args = c[3:]
        else:
            continue
        if "install" not in args:
            continue
        if "--break-system-packages" in args or str(Path(c[0]).parent.parent) not in venvs:
            found.append(shlex.join(c))
    return found


def readme_block(heading: str) -> str:
    """The first ```sh block under a README heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match, f"no sh block under '## {heading}'"
    return match[1]


def unit_install_steps() -> str:
    unit = (ROOT / "systemd" / "registry-mirror.service").read_text()
    return "\n".join(line[4:] for line in unit.splitlines() if line.startswith("#   "))


def test_the_check_catches_installs_into_the_systems_python() -> None:
    assert problems("pip install . && registry-mirror serve --config conf/mirror.yaml")
    assert problems("python3 -m pip install -q --disable-pip-version-check -e '.[test]'")
    assert problems("python3 -m venv .venv\n/usr/bin/pip install .")
    assert problems("python3 -m venv v && v/bin/pip install --break-system-packages .")
    assert problems('v=.venv\npython3 -m venv other\n"$v/bin/python" -m pip install .')
    assert problems("python3 -m venv .venv\nexec sudo PIP_X=1 pip install .")
    assert not problems('v=.venv\npython3 -m venv "$v"\n"$v/bin/python" -m \\\n pip install -e .')
    assert not problems("python3 -m venv /opt/x/venv\n/opt/x/venv/bin/pip install .")


def test_scripts_install_into_a_virtual_environment() -> None:
    for name in SCRIPTS:
        text = (ROOT / name).read_text()
        assert problems(text) == [], name
    venv = commands((ROOT / "scripts" / "venv").read_text())
    assert ".venv" in venvs_made(venv), "scripts/venv makes .venv"
    for name in ("tests/run", "benchmarks/run"):
        cmds = commands((ROOT / name).read_text())
        assert ["bash", "scripts/venv", "-e", ".[test]"] in cmds, name
        # What they run comes from that environment, not from whatever python3 is on PATH.
        for c in cmds:
            assert c[0] not in ("python", "python3", "pip", "pip3", "pytest", "ruff"), (name, c)


def test_systemd_install_steps_use_a_virtual_environment() -> None:
    steps = unit_install_steps()
    assert problems(steps) == []
    assert any("pip" in c[0] for c in commands(steps)), "the steps install the package"


def test_readme_commands_install_into_a_virtual_environment_and_run_from_it() -> None:
    run_it = readme_block("Run it")
    assert problems(run_it) == [], run_it
    cmds = commands(run_it)
    venvs = venvs_made(cmds)
    assert venvs, f"the run command makes a virtual environment:\n{run_it}"
    served = [c for c in cmds if Path(c[0]).name == "registry-mirror"]
    assert served, run_it
    for c in served:
        assert str(Path(c[0]).parent.parent) in venvs, f"run from the environment: {c}"
    tests = readme_block("Tests")
    assert problems(tests) == [] and ["bash", "tests/run"] in commands(tests), tests
