"""Every command line's ``--help`` as a terminal shows it: lines that fit, plain text (no
reStructuredText), the choices of a flag, required flags marked, the examples that parse, and
"step" said precisely where it is not an environment step."""

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
from terminal import run_on_terminal

from ppo_cbp import train
from ppo_cbp.cli import help_description
from ppo_cbp.cli import parse as cli_parse
from ppo_cbp.ppo.settings import given_fields
from ppo_cbp.train import Args

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ["permuted-mnist", "slowly-changing-regression", "continual-imagenet"]
BENCHMARKS += ["incremental-cifar"]


def load(script: str):
    """The script's module (``ppo_cbp/train.py`` is the package's ``ppo_cbp.train``)."""
    if script == "ppo_cbp/train.py":
        return train
    name = Path(script).stem + "_script"
    if name not in sys.modules:  # registered: dataclasses look their module up
        spec = importlib.util.spec_from_file_location(name, ROOT / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def help_of(script: str, args: list[str], capsys, monkeypatch, columns: int = 100) -> str:
    """What ``python <script> <args> --help`` prints in a terminal ``columns`` wide."""
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(sys, "argv", [script, *args, "--help"])
    with pytest.raises(SystemExit) as info:
        if script == "ppo_cbp/train.py":
            train.cli()
        else:
            load(script).main([*args, "--help"])
    assert info.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


COMMANDS = [
    ("ppo_cbp/train.py", []),
    ("scripts/supervised.py", []),
    *[("scripts/supervised.py", [b]) for b in BENCHMARKS],
    ("scripts/reproduce.py", []),
    ("scripts/plot.py", []),
    ("scripts/sweep.py", []),
]


@pytest.mark.parametrize("script, args", COMMANDS, ids=[" ".join([s, *a]) for s, a in COMMANDS])
def test_help_fits_the_terminal_and_is_plain_text(script, args, capsys, monkeypatch):
    text = help_of(script, args, capsys, monkeypatch)
    lines = text.splitlines()
    assert len(lines) > 10
    too_long = [line for line in lines if len(line) > 100]
    assert too_long == []
    assert "``" not in text and not re.search(r":[a-z]+:`", text), text
    assert "@@" not in text  # the description stands where tyro was told to put it
    # the description comes first, below the usage, as prose wrapped to the width
    description = text.split("\n\n", 2)[1]
    assert description.strip() and "usage:" not in description


def test_help_description_wraps_paragraphs_and_keeps_commands():
    doc = """Title line.

        python x.py --flag value   # a command, kept as written even if it is long
        python x.py --other

    A paragraph with ``code``, a :func:`ppo_cbp.cli.parse` role and a shortened
    :class:`~ppo_cbp.errors.UsageError` role, long enough to be wrapped twice.

    1. an item that is long enough to wrap onto a second line
    2. a short one

    Usage::
    """
    assert help_description(doc, width=40).split("\n") == [
        "Title line.",
        "",
        "    python x.py --flag value   # a command, kept as written even if it is long",
        "    python x.py --other",
        "",
        "A paragraph with code, a",
        "ppo_cbp.cli.parse role and a shortened",
        "UsageError role, long enough to be",
        "wrapped twice.",
        "",
        "1. an item that is long enough to wrap",
        "   onto a second line",
        "2. a short one",
        "",
        "Usage:",
    ]


def test_long_usage_lines_are_wrapped(capsys, monkeypatch):
    text = help_of("scripts/supervised.py", [], capsys, monkeypatch, columns=80)
    usage = text.split("\n\n")[0].splitlines()
    assert usage == [
        "usage: scripts/supervised.py [-h]",
        "       {" + ",".join(BENCHMARKS) + "}",
    ]


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_supervised_help_lists_the_choices_of_device_and_utility(benchmark, capsys, monkeypatch):
    text = help_of("scripts/supervised.py", [benchmark], capsys, monkeypatch)
    assert "--device {auto,cpu,cuda}" in text
    assert "--utility {contribution,adaptable_contribution}" in text


def test_a_device_that_is_not_a_choice_is_one_line(tmp_path, capsys):
    supervised = load("scripts/supervised.py")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        supervised.main(["slowly-changing-regression", "--device", "gpu", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "gpu" in err[0], err
    assert not out.exists()


def test_sweep_help_marks_its_required_flags(capsys, monkeypatch):
    text = help_of("scripts/sweep.py", [], capsys, monkeypatch)
    required = text.split("\nrequired arguments:\n", 1)[1]
    assert re.search(r"^  --seeds ", required, re.M) and re.search(r"^  --name ", required, re.M)
    optional = text.split("\noptions:\n", 1)[1].split("\nrequired arguments:\n")[0]
    assert not re.search(r"^  --(seeds|name) ", optional, re.M)


def flag_help(text: str, flag: str) -> str:
    """The help of ``flag`` in a tyro box, its rows joined."""
    rows = [row.strip("│ ") for row in text.splitlines()]
    start = next(i for i, r in enumerate(rows) if r.startswith(flag + " "))
    end = next(i for i in range(start + 1, len(rows)) if rows[i].startswith("--"))
    return " ".join(" ".join(rows[start:end]).split())


def test_step_means_a_minibatch_update_where_it_is_not_an_environment_step(capsys, monkeypatch):
    text = help_of("ppo_cbp/train.py", [], capsys, monkeypatch)
    for flag in ("--replacement-rate", "--maturity-threshold", "--redo-period"):
        assert "minibatch update" in flag_help(text, flag), flag
        assert "not an environment step" in flag_help(text, flag) or (
            "not environment steps" in flag_help(text, flag)
        ), flag
    text = help_of("scripts/supervised.py", ["permuted-mnist"], capsys, monkeypatch)
    for flag in ("--replacement-rate", "--maturity-threshold", "--redo-period"):
        assert "optimizer step" in flag_help(text, flag) and "minibatch" in flag_help(text, flag)


def test_train_help_examples_parse(capsys, monkeypatch):
    text = help_of("ppo_cbp/train.py", [], capsys, monkeypatch)
    examples = [line.split("#")[0].split() for line in text.splitlines()]
    examples = [words[2:] for words in examples if words[:2] == ["python", "ppo_cbp/train.py"]]
    assert len(examples) == 2
    new, resume = (cli_parse(Args, words) for words in examples)
    assert given_fields(Args, examples[0]) == {"env", "cbp", "steps"}
    assert (new.env, new.cbp, new.steps) == ("Hopper-v4", True, 1_000_000)
    assert (resume.resume, resume.steps) == ("runs/<run_name>", 2_000_000)


def field_docstrings(path: Path) -> dict[str, str]:
    """Each dataclass field's docstring in the module at ``path``, by ``Class.field``."""
    docs = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            body = node.body
            for field, doc in zip(body, body[1:]):
                if (
                    isinstance(field, ast.AnnAssign)
                    and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)
                ):
                    docs[f"{node.name}.{field.target.id}"] = doc.value.value
    return docs


def test_flag_docstrings_are_one_line():
    """tyro keeps the line breaks of a field docstring that spans lines (it strips them before
    it dedents), so a flag's help would break mid-sentence: each is written on one line."""
    modules = ["ppo_cbp/train.py", "scripts/reproduce.py", "scripts/plot.py"]
    modules += [str(p.relative_to(ROOT)) for p in (ROOT / "ppo_cbp" / "benchmarks").glob("*.py")]
    docs = {}
    for module in modules:
        docs.update({f"{module}:{k}": v for k, v in field_docstrings(ROOT / module).items()})
    assert len(docs) > 60
    assert [name for name, doc in docs.items() if "\n" in doc] == []


@pytest.mark.slow
def test_help_on_a_terminal_fits_it_too():
    """On a terminal tyro colours the help: the lines still fit once the colours are taken out
    (80 columns: too narrow for the example commands and the list of benchmarks, which are
    kept whole)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    cmd = [sys.executable, "scripts/supervised.py", "--help"]
    code, text, _ = run_on_terminal(cmd, ROOT, 80, stdout_too=True, env=dict(env, TERM="xterm"))
    assert code == 0
    assert "\x1b[" in text  # coloured: it knew it was on a terminal
    lines = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r", "").splitlines()
    assert lines[:2] == [
        "usage: scripts/supervised.py [-h]",
        "       {" + ",".join(BENCHMARKS) + "}",
    ]
    # all but the example commands and the list of benchmarks, which are kept whole
    prose = [line for line in lines[2:] if not line.startswith("    python ")]
    assert len(prose) > 20 and max(map(len, prose)) <= 80
