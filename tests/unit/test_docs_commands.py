"""Every command README.md and docs/*.md show still runs: the subcommand, its options and every config field
exist, and the config the command would train with validates.

Commands are taken from fenced shell blocks (a block with ``$ `` prompts: only those lines) and from inline
code spans that start a command. Each one is classified:

- **synopsis** (``[optional]`` groups, ``...``, or upper-case placeholders such as ``RUN_DIR``, ``N``,
  ``SPACE.yaml``): the subcommand exists, each ``--option`` is one of that subcommand's, and each
  ``field=value`` (other than the literal ``key=value``) names a TrainConfig field;
- **mention** (an inline ``steadyfit report``): the subcommand exists;
- **concrete**: run through the real ``steadyfit.cli.main`` (parser, source/override handling, exit codes)
  with the training replaced by building and validating its config and resolving its recipe. YAML files
  the command names that are not in the repository (``my.yaml``, ``space.yaml``) are written into the
  working directory first: a config naming ``recipe: digits``, or a search space.

``make X`` needs a Makefile target ``X``; ``python examples/x.py`` and ``torchrun x.py`` need the script;
``pip install steadyfit[extra]`` needs the extra in pyproject.toml. A few commands also run end to end
with tiny overrides (``max_steps=2``) in a temporary directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from steadyfit import cli
from steadyfit.assembly import prepare
from steadyfit.config import TrainConfig
from steadyfit.diagnostics import validate_diagnostics
from steadyfit.recipes import resolve_recipe

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}
# Appended to commands run end to end: later key=value arguments win, so the doc's own values stay parsed.
TINY = ["max_steps=2", "log_every=1", "progress=false"]
SPACE_YAML = "lr: {type: float, low: 1e-4, high: 1e-1, log: true}\n"
USER_CONFIG_YAML = "recipe: digits\n"
PLACEHOLDER = re.compile(r"^(\.\.\.|<[^>]*>|[A-Z][A-Z0-9_]*(\.[a-z]+)?)$")
USER_RECIPE = re.compile(r"^([A-Za-z_]\w*):([A-Za-z_]\w*)$")
FIELD_ASSIGNMENT = re.compile(r"^([a-z_][a-z0-9_.]*)=")


@dataclass(frozen=True)
class DocCommand:
    where: str  # docs/x.md:LINE
    tokens: tuple[str, ...]  # one shell command, comments and prompt removed
    inline: bool  # from an inline code span rather than a fenced block

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.tokens)}"


# ------------------------------------------------------------------------------------------- extraction
def _split_commands(text: str) -> list[list[str]]:
    """Shell words of ``text``, split at ``&&``, ``;`` and ``|``; ``# comments`` dropped."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: not a command
        return []
    commands: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", ";", "||", "|"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [command for command in commands if command]


def _fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command line) from the fenced shell blocks of a Markdown text."""
    result: list[tuple[int, str]] = []
    fence: str | None = None
    language = ""
    block: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            match = re.match(r"(```+|~~~+)\s*([\w+-]*)", stripped)
            if match:
                fence, language, block = match.group(1), match.group(2).lower(), []
            continue
        if stripped.startswith(fence):
            if language in SHELL_FENCES:
                prompted = [(n, s[2:]) for n, s in block if s.startswith("$ ")]
                result.extend(prompted or block)
            fence = None
            continue
        block.append((number, stripped))
    joined: list[tuple[int, str]] = []
    for number, line in result:  # join `\` continuations
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line)
        else:
            joined.append((number, line))
    return joined


def extract_commands(path: Path) -> list[DocCommand]:
    text = path.read_text(encoding="utf-8")
    where = path.relative_to(ROOT).as_posix()
    found: list[DocCommand] = []
    for number, line in _fenced_lines(text):
        for tokens in _split_commands(line):
            found.append(DocCommand(f"{where}:{number}", tuple(tokens), inline=False))
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"\s*(```|~~~)", line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            for tokens in _split_commands(span):
                found.append(DocCommand(f"{where}:{number}", tuple(tokens), inline=True))
    return [command for command in found if _kind(command) != "other"]


def _steadyfit_argv(tokens: tuple[str, ...]) -> list[str] | None:
    """The arguments after ``steadyfit`` / ``python -m steadyfit`` / ``torchrun ... -m steadyfit``."""
    if tokens[0] == "steadyfit":
        return list(tokens[1:])
    for start in range(len(tokens) - 1):
        if tokens[start] == "-m" and tokens[start + 1] == "steadyfit" and tokens[0] in ("python", "torchrun"):
            return list(tokens[start + 2 :])
    return None


def _kind(command: DocCommand) -> str:
    tokens = command.tokens
    argv = _steadyfit_argv(tokens)
    if argv is not None:
        if not argv:
            return "other"  # `steadyfit` alone: a name in prose
        if any(_is_placeholder(token) for token in argv):
            return "synopsis"
        return "mention" if command.inline and len(argv) == 1 else "concrete"
    if tokens[0] == "make" and len(tokens) > 1:
        return "make"
    if tokens[0] in ("python", "torchrun") and any(token.endswith(".py") for token in tokens):
        return "script"
    if tokens[0] == "pip" and any("steadyfit[" in token or token.startswith(".[") for token in tokens):
        return "pip"
    return "other"


def _is_placeholder(token: str) -> bool:
    if token.startswith("[") or (token.endswith("]") and "=[" not in token):
        return True
    return bool(PLACEHOLDER.match(token))


ALL_COMMANDS = [command for path in DOC_FILES for command in extract_commands(path)]


# --------------------------------------------------------------------------------------------- checking
def _subcommands() -> dict[str, set[str]]:
    """Each subcommand of the real parser with its option strings."""
    parser = cli.build_parser()
    (subparsers,) = [action for action in parser._actions if action.choices and action.dest == "command"]
    return {
        name: {option for action in sub._actions for option in action.option_strings}
        for name, sub in subparsers.choices.items()
    }


def _check_synopsis(argv: list[str]) -> None:
    commands = _subcommands()
    words = [word.strip("[]") for word in argv]
    if PLACEHOLDER.match(words[0]):
        return  # `python -m steadyfit ...`
    assert words[0] in commands, f"no subcommand {words[0]!r}; the parser has {sorted(commands)}"
    for word in words[1:]:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert option in commands[words[0]], (
                f"`steadyfit {words[0]}` has no option {option}; it has {sorted(commands[words[0]])}"
            )
        match = FIELD_ASSIGNMENT.match(word)
        if match and match.group(1) != "key":
            assert match.group(1) in TrainConfig.model_fields, f"{match.group(1)} is not a TrainConfig field"


def _validate_config(source: str | None, overrides: list[str]) -> None:
    recipe, config = prepare(source, overrides)
    resolve_recipe(recipe)  # an unknown recipe or an unimportable module is a ConfigError
    validate_diagnostics(config.stop_on, config.diagnostic_thresholds)


def _write_user_files(argv: list[str], cwd: Path) -> list[str]:
    """``argv`` with repository files made absolute; a YAML file the repository lacks is written to ``cwd``,
    and so is the module of a ``module:function`` recipe that is not importable (the digits recipe)."""
    resolved = []
    for index, word in enumerate(argv):
        recipe = USER_RECIPE.match(word)
        if index == 1 and recipe and importlib.util.find_spec(recipe.group(1)) is None:
            (cwd / f"{recipe.group(1)}.py").write_text(
                f"from steadyfit.recipes.digits import build as {recipe.group(2)}\n"
            )
        if word.endswith((".yaml", ".yml")) and "=" not in word:
            if (ROOT / word).is_file():
                word = str(ROOT / word)
            elif not (cwd / word).exists():
                (cwd / word).parent.mkdir(parents=True, exist_ok=True)
                space = index > 0 and argv[index - 1] == "--space"
                (cwd / word).write_text(SPACE_YAML if space else USER_CONFIG_YAML)
        resolved.append(word)
    return resolved


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``steadyfit.cli.main(argv)`` with stdout and stderr captured: (exit status, output)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        status = cli.main(argv)
    return status, output.getvalue()


def check_concrete(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse ``argv`` with the real CLI and validate the config it would train with, without training."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the working directory on it
    argv = _write_user_files(argv, cwd)
    ran: list[str] = []

    def fake_fit(source: str | None, overrides: list[str], *rest: object) -> int:
        _validate_config(source, overrides)
        ran.append("fit")
        return 0

    def fake_sweep(args: object) -> int:
        _validate_config(args.source, args.overrides)
        from steadyfit.sweep import read_space

        read_space(args.space)
        ran.append("sweep")
        return 0

    def fake_run_dir_command(*args: object, **kwargs: object) -> int:
        ran.append("run_dir")
        return 0

    monkeypatch.setattr(cli, "run_fit", fake_fit)
    monkeypatch.setattr(cli, "run_lr_find", fake_fit)
    monkeypatch.setattr(cli, "run_sweep_command", fake_sweep)
    monkeypatch.setattr(cli, "run_sample", fake_run_dir_command)
    monkeypatch.setattr(cli, "run_report", fake_run_dir_command)
    modules = set(sys.modules)
    try:
        status, output = run_cli(argv)
    finally:
        for name in set(sys.modules) - modules:  # a user recipe module written into cwd
            if name.split(".")[0] in {p.stem for p in cwd.glob("*.py")}:
                del sys.modules[name]
    assert status == 0, f"steadyfit {shlex.join(argv)} exits {status}:\n{output}"
    assert ran, f"steadyfit {shlex.join(argv)} reached no command"


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.MULTILINE))


def _extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return set(project["optional-dependencies"])


def check_command(command: DocCommand, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kind, tokens = _kind(command), command.tokens
    if kind == "make":
        targets = [token for token in tokens[1:] if not token.startswith("-") and "=" not in token]
        missing = set(targets) - _makefile_targets()
        assert not missing, f"no Makefile target {sorted(missing)}"
    elif kind == "script":
        script = next(token for token in tokens if token.endswith(".py"))
        assert (ROOT / script).is_file(), f"{script} does not exist"
    elif kind == "pip":
        named = {
            extra.strip()
            for token in tokens
            for group in re.findall(r"\[([^\]]*)\]", token)
            for extra in group.split(",")
        }
        unknown = {extra for extra in named if not PLACEHOLDER.match(extra)} - _extras()
        assert not unknown, f"no extra {sorted(unknown)} in pyproject.toml (it has {sorted(_extras())})"
    else:
        argv = _steadyfit_argv(tokens)
        assert argv is not None
        if kind in ("synopsis", "mention"):
            _check_synopsis(argv)
        else:
            check_concrete(argv, cwd, monkeypatch)


def _param(command: DocCommand) -> object:
    return pytest.param(command, id=str(command))


# ------------------------------------------------------------------------------------------------ tests
def test_the_docs_show_commands_of_every_kind():
    kinds = [_kind(command) for command in ALL_COMMANDS]
    assert kinds.count("concrete") >= 8, ALL_COMMANDS
    assert {"synopsis", "mention", "make", "script", "pip"} <= set(kinds)
    shown = {(_steadyfit_argv(c.tokens) or ["-"])[0].strip("[]") for c in ALL_COMMANDS}
    assert set(_subcommands()) <= shown, "a subcommand no doc shows"


@pytest.mark.parametrize("command", [_param(command) for command in ALL_COMMANDS])
def test_doc_command_parses_and_validates(command, tmp_path, monkeypatch):
    check_command(command, tmp_path, monkeypatch)


@pytest.mark.parametrize(
    "text",
    [
        "steadyfit fitt digits",  # no such subcommand
        "steadyfit fit digits max_step=3",  # no such field (did you mean max_steps)
        "steadyfit fit digits optimizer=adamm",  # not an allowed value
        "steadyfit fit nosuchrecipe",  # neither built-in nor package.module:function
        "steadyfit fit digits stop_on=[nosuchcheck]",
        "steadyfit report runs/x --bogus",  # no such option
        "steadyfit sample runs/x --chars many",
        "steadyfit sweep digits --space space.yaml",  # --trials is required
        "steadyfit report RUN_DIR [--nope FILE.png]",  # synopsis with an option that does not exist
        "steadyfit fitt [key=value ...]",
        "steadyfit fit [RECIPE_OR_CONFIG.yaml] [max_stepz=N]",
        "make nosuchtarget",
        "python examples/nosuchexample.py",
        "pip install 'steadyfit[nosuchextra]'",
    ],
)
def test_the_check_refuses_stale_commands(text, tmp_path, monkeypatch):
    (tokens,) = _split_commands(text)
    command = DocCommand("test", tuple(tokens), inline=False)
    assert _kind(command) != "other"
    with pytest.raises(AssertionError):
        check_command(command, tmp_path, monkeypatch)


def test_readme_lists_every_extra():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (listed,) = re.findall(r"#\s*extras:\s*([^\n]+)", readme)
    assert {name.strip() for name in listed.split(",")} == _extras()


# --------------------------------------------------------------------------------------------- end to end
def _shown(prefix: str) -> list[str]:
    """The argv of the first concrete doc command starting with ``steadyfit <prefix>``."""
    for command in ALL_COMMANDS:
        argv = _steadyfit_argv(command.tokens)
        if _kind(command) == "concrete" and argv and shlex.join(argv).startswith(prefix):
            return argv
    raise AssertionError(f"no doc shows `steadyfit {prefix} ...` any more; update this test")


def _run_ok(argv: list[str]) -> str:
    status, output = run_cli(argv)
    assert status == 0, f"steadyfit {shlex.join(argv)} exits {status}:\n{output}"
    return output


def test_digits_fit_and_report_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    # README: `make demo` runs `steadyfit fit` and "leaves its results in runs/digits/".
    _run_ok(["fit", *TINY])
    assert (tmp_path / "runs/digits/final/model.safetensors").is_file()
    # README: the source-less form, overrides only.
    _run_ok([*_shown("fit lr="), *TINY])
    assert (tmp_path / "runs/try2/metrics.jsonl").is_file()
    # docs/report.md: the report of the digits run, with the summary lines the example shows.
    output = _run_ok(_shown("report runs/digits"))
    for label in ("run ", "progress ", "best ", "final ", "non-finite ", "diagnostics "):
        assert any(line.startswith(label) for line in output.splitlines()), output
    assert "wrote runs/digits/report.png" in output


def test_tinylm_fit_and_sample_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    # docs/tinylm.md: the recipe with its defaults, then text from the finished run.
    _run_ok([*_shown("fit tinylm"), *TINY, "warmup_steps=0"])  # its 50 warm-up steps must end before step 2
    sample = _shown("sample runs/tinylm")
    output = _run_ok(sample)
    assert output.startswith(sample[sample.index("--prompt") + 1]), output


def test_sweep_runs_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    # docs/sweeps.md's first command, one trial of two steps (later key=value arguments win).
    argv = _write_user_files(_shown("sweep digits"), tmp_path)
    argv[argv.index("--trials") + 1] = "1"
    _run_ok([*argv, *TINY])
    assert (tmp_path / argv[argv.index("--dir") + 1] / "results.md").is_file()
