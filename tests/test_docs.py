"""The README and the manual (docs/) cannot drift from the code: the site builds with `mkdocs build --strict`
(its reference pages generated from the parser, the config and the sweep spec); every `alexnet ...` command
line they show parses with the real CLI parser; every TOML example loads with the config or sweep loader;
the numbers the prose quotes are the code's; the pictures are the browser test's screenshots."""

import contextlib
import dataclasses
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet import cli
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
GEN = runpy.run_path(str(ROOT / "docs" / "gen_reference.py"))
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL_ENDS = {">", ">>", "2>", "2>&1", "|", "||", "&&", ";", "&"}


def text(page: Path) -> str:
    return page.read_text()


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --- The site -----------------------------------------------------------------------------------------

def test_the_manual_builds_strict_offline_with_generated_references(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from alexnet.sweep.spec import FILE_KEYS
    from alexnet.training.config import FIELDS

    cli_html = (site / "reference" / "cli" / "index.html").read_text()
    for command in ("train", "sweep", "runs", "ui", "server", "push", "gc", "promote", "confirm", "reproduce"):
        assert f"alexnet {command}" in cli_html, command
    assert "--warm-start" in cli_html and "--kill-stale" in cli_html
    config_html = (site / "reference" / "config" / "index.html").read_text()
    assert all(f"<code>{name}</code>" in config_html for name in FIELDS)
    sweep_html = (site / "reference" / "sweep-file" / "index.html").read_text()
    assert all(f"<code>{key}</code>" in sweep_html for key in FILE_KEYS)
    assert (site / "reference" / "numbers" / "index.html").is_file()
    assert not (site / "gen_reference.py").exists()  # the hook is not published


def test_the_reference_pages_follow_the_code(monkeypatch):
    """The generated pages change when the code does: a new option, a new default."""
    from alexnet.training import config

    assert "`--kill-stale`" in GEN["cli_page"]()
    field = config.FIELDS["lr"]
    monkeypatch.setattr(field, "default", 0.123)
    assert "| `lr` | float | `0.123` |" in GEN["config_page"]()


# --- Command lines ------------------------------------------------------------------------------------

def command_lines(page_text: str) -> list[str]:
    """Every `alexnet ...` command line a page shows: in code blocks (a `$ ` prompt, `VAR=value` prefixes
    and `\\` continuations allowed; in a transcript, only its `$ ` lines) and in inline code. Output lines (`alexnet: store ...`,
    `alexnet train: error: ...`) are not commands."""
    found = []
    for lang, body in FENCE.findall(page_text):
        if lang in ("python", "toml", "yaml", "text"):  # `text`: output, shown as a program printed it
            continue
        body = re.sub(r"\\\n\s*", " ", body)
        prompted = re.search(r"^\s*\$\s", body, re.M)  # a transcript: only its `$ ` lines are commands
        for line in body.splitlines():
            if prompted and not re.match(r"^\s*\$\s", line):
                continue
            line = re.sub(r"^\s*\$\s+", "", line).strip()
            line = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)+", "", line)
            if line.startswith("alexnet "):
                found.append(line)
    for span in re.findall(r"`(alexnet [^`]+)`", FENCE.sub("", page_text)):
        found.append(" ".join(span.split()))  # an inline command may wrap across lines
    return [line for line in found if not line.split()[1].endswith(":")]


def check_command(line: str) -> None:
    """Parse a command line with the `alexnet` parser; AssertionError with argparse's complaint if it fails."""
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        if word in SHELL_ENDS:
            words = words[:i]
            break
    args = words[1:]
    parser = cli.build_parser()
    if "-h" in args or "--help" in args or len(args) == 1:  # `alexnet sweep --help`, or a command's name
        sub = [a for a in args if a not in ("-h", "--help")]
        choices = next(a for a in parser._actions if a.dest == "command").choices
        if sub and sub[0] not in choices:
            raise AssertionError(f"{line!r} does not parse: no command {sub[0]!r}")
        return
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(args)
    except SystemExit as e:
        complaint = stderr.getvalue().strip().splitlines()[-1:] or [f"exit {e.code}"]
        raise AssertionError(f"{line!r} does not parse: {complaint[0]}") from None


def test_the_pages_show_commands():
    lines = {rel(page): command_lines(text(page)) for page in PAGES}
    assert len(lines["README.md"]) >= 5
    assert sum(map(len, lines.values())) >= 80
    assert any(line.startswith("alexnet runs --kill-stale") for line in lines["docs/comparing-runs.md"])
    assert "alexnet train: error: config: dropout = 1.0 is out of range" not in str(lines)  # output, not a command


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_command_line_parses_with_the_real_cli(page):
    bad = []
    for line in command_lines(text(page)):
        try:
            check_command(line)
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, "\n".join(bad)


def test_a_command_line_with_a_removed_flag_fails():
    check_command("alexnet runs --sweep demo --pareto   # fine")
    check_command("alexnet sweep sweeps/smoke.toml --workers 2 --set lr=0.1 > sweep.log")
    for broken in ("alexnet runs --sweep demo --no-such-flag", "alexnet sweep sweeps/smoke.toml --workers two",
                   "alexnet nosuchcommand", "alexnet confirm demo --top 0", "alexnet ui --port 70000"):
        with pytest.raises(AssertionError, match="does not parse"):
            check_command(broken)


# --- TOML examples ------------------------------------------------------------------------------------

def toml_examples() -> list[tuple[str, str]]:
    return [(rel(page), body) for page in PAGES for lang, body in FENCE.findall(text(page)) if lang == "toml"]


def test_every_toml_example_loads_with_the_config_or_sweep_loader(home, tmp_path):
    from alexnet.sweep.spec import FILE_KEYS, load_sweep
    from alexnet.training.config import FIELDS, load_config

    examples = toml_examples()
    assert len(examples) >= 2
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")  # a sweep's `base` is relative to its file
    (tmp_path / "sweeps").mkdir()
    kinds = set()
    for i, (where, body) in enumerate(examples):
        keys = set(re.findall(r"^\s*([A-Za-z_]\w*)\s*=", body, re.M))
        is_sweep = "[space]" in body or "[set]" in body or bool(keys & (FILE_KEYS - set(FIELDS)))
        path = tmp_path / ("sweeps" if is_sweep else "experiments-tmp") / f"example{i}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(body)
        try:
            load_sweep(path) if is_sweep else load_config(path)
        except Exception as e:
            raise AssertionError(f"{where}: the TOML example {i} does not load: {e}\n{body}") from None
        kinds.add(is_sweep)
    assert kinds == {True, False}  # both loaders were exercised


def test_a_broken_toml_example_would_fail(home, tmp_path):
    from alexnet import UsageError
    from alexnet.training.config import load_config

    path = tmp_path / "x.toml"
    path.write_text(toml_examples()[0][1].replace("lr = 0.1", "learning_rate = 0.1"))
    with pytest.raises(UsageError):
        load_config(path)


# --- Numbers the prose quotes -------------------------------------------------------------------------

def claims():
    """(page, the words as they must stand, the code's value in them)."""
    from alexnet import compat
    from alexnet.sweep.spec import SWEEP_VAL_SIZE, Sweep, load_sweep
    from alexnet.training import sizes
    from alexnet.training.config import load_config

    n = GEN["constants"]()
    smoke = load_config(ROOT / "experiments" / "smoke.toml")
    trials = {name: load_sweep(ROOT / "sweeps" / f"{name}.toml").n_trials for name in ("smoke", "default")}
    mb = lambda resize: f"{sizes.weights_bytes(resize) / 1e6:.0f} MB"  # noqa: E731
    sweep_defaults = {f.name: f.default for f in dataclasses.fields(Sweep)}
    pack_tol = re.search(r"^LOSS_TOL = (\S+)", (ROOT / "tests" / "test_pack.py").read_text(), re.M).group(1)
    warmup = sweep_defaults["pruner_warmup_epochs"]
    versions = f"**MLflow {compat.MLFLOW_SUPPORTED}** and **Optuna {compat.OPTUNA_SUPPORTED}**"
    return [
        ("docs/getting-started.md", f"SQLite writers wait up to {n['SQLITE_TIMEOUT_S']} s for each other's lock"),
        ("docs/getting-started.md", f"tried again, up to {n['OPEN_ATTEMPTS']} times a second apart"
         if n["OPEN_RETRY_S"] == 1.0 else "OPEN_RETRY_S changed"),
        ("docs/sweeps.md", f"A sweep holds out {SWEEP_VAL_SIZE:,} training images"),
        ("docs/honest-results.md", f"A sweep holds out {SWEEP_VAL_SIZE:,} images"),
        ("docs/sweeps.md", f"fresh seeds ({n['FIRST_SEED']}, {n['FIRST_SEED'] + 1}, ...)"),
        ("docs/sweeps.md", f"p < {n['ALPHA']}"),
        ("docs/reproducibility.md", f"tolerance of **{n['GPU_ACC_TOLERANCE']}**"),
        ("docs/reproducibility.md", f"an untracked file over {n['MAX_UNTRACKED_BYTES'] >> 20} MB left out"),
        ("docs/scaling-out.md", f"Ray runs their tasks again (up to {n['MAX_RETRIES']} times)"),
        ("docs/training.md", f"Resizes below {n['MIN_RESIZE']} are refused"),
        ("docs/training.md", f"parameters: {sizes.parameter_count(224):,} (resize 224"),
        ("docs/disk.md", f"at resize 224 each weight file is about {mb(224)}"),
        ("docs/disk.md", f"at resize 67-96 about {mb(96)}"),
        ("docs/shipping.md", f"{sizes.flops_per_image(67) * 3 / 1e9:.2f} GFLOP at resize 67, "
                             f"{sizes.flops_per_image(96) * 3 / 1e9:.2f} at 96 and {sizes.flops_per_image(224) * 3 / 1e9:.1f}"),
        ("docs/getting-started.md", f"{smoke.train_limit:,} class-balanced images at resize {smoke.resize}, batch "
                                    f"{smoke.batch_size}, lr {smoke.lr}, {smoke.epochs} epochs"),
        ("README.md", f"The smoke run trains {smoke.train_limit:,} images at resize {smoke.resize} for {smoke.epochs} epochs"),
        ("docs/sweeps.md", f"CPU: {trials['smoke']} small trials"),
        ("docs/sweeps.md", f"GPU: {trials['default']} full-data trials"),
        ("README.md", f"GPU: {trials['default']} full-data trials"),
        ("docs/sweeps.md", f"`max_retry` (default {sweep_defaults['max_retry']}) bounds how many times in a row"),
        ("docs/scaling-out.md", f"`max_retry` (default {sweep_defaults['max_retry']}) bounds the retries in a row"),
        ("docs/sweeps.md", f"With the default W = {warmup}, no trial is pruned before it has trained {warmup + 1} epochs"),
        ("docs/sweeps.md", f"each member's losses match its separate run within {pack_tol}"),
        ("docs/sweeps.md", f"Holm-adjusted p < {n['ALPHA']}"),
        ("docs/honest-results.md", f"Holm-adjusted p < {n['ALPHA']}"),
        ("docs/scaling-out.md", f"a `heartbeat` renewed every {n['HEARTBEAT_S']} s"),
        ("docs/scaling-out.md", f"its heartbeat is more than {n['STALE_AFTER_S'] // 60} minutes old"
         if n["STALE_AFTER_S"] % 60 == 0 else "STALE_AFTER_S is not whole minutes"),
        ("docs/comparing-runs.md", f"renews a `heartbeat` tag every {n['HEARTBEAT_S']} s"),
        ("docs/comparing-runs.md", f"its heartbeat is more than {n['STALE_AFTER_S'] // 60} minutes old"),
        ("docs/training.md", f"a `heartbeat` renewed every {n['HEARTBEAT_S']} s"),
        ("docs/getting-started.md", versions),
        ("docs/architecture.md", versions),
    ]


@pytest.mark.parametrize("page,words", claims())
def test_the_numbers_the_prose_quotes_are_the_codes(page, words):
    flat = lambda t: " ".join(t.split())  # noqa: E731  (line breaks aside)
    assert flat(words) in flat((ROOT / page).read_text()), f"{page} should say: {words!r}"


def test_the_smoke_runs_accuracy_is_quoted_alike_everywhere():
    """experiments/smoke.toml, the manual's getting-started page and the README quote the same test accuracy."""
    quoted = {}
    for path in (ROOT / "experiments" / "smoke.toml", ROOT / "docs" / "getting-started.md", ROOT / "README.md"):
        found = set(re.findall(r"test accuracy (?:ends at )?about (0\.\d+)", path.read_text(), re.I))
        assert len(found) == 1, f"{path.name}: {found or 'no test accuracy about X'}"
        quoted[path.name] = found.pop()
    assert len(set(quoted.values())) == 1, quoted


# --- Pictures and the front page ----------------------------------------------------------------------

def test_every_picture_is_a_screenshot_the_browser_test_takes():
    taken = set(re.findall(r'screenshot\(page, "([\w-]+\.png)"\)', (ROOT / "tests" / "test_ui_browser.py").read_text()))
    shown = {name for page in PAGES for name in re.findall(r"\]\((?:docs/)?assets/([\w-]+\.png)\)", text(page))}
    assert shown, "the manual shows no screenshots"
    assert shown <= taken, f"pictures no test takes: {sorted(shown - taken)}"
    missing = [name for name in shown if not (ROOT / "docs" / "assets" / name).is_file()]
    assert not missing, f"run ALEXNET_DOCS_SCREENSHOTS=1 pytest tests/test_ui_browser.py: missing {missing}"


def test_the_readme_is_a_front_page():
    readme = text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 150
    for page in re.findall(r"\]\((docs/[\w/-]+\.md)\)", readme):
        assert (ROOT / page).is_file() or page.removeprefix("docs/") in GEN["PAGES"], page  # or generated
    assert "mkdocs serve" in readme and "scripts/demo" in readme and "scripts/test" in readme
