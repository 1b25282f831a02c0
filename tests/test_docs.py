"""Every shell block of README.md and docs/*.md, run as written, offline, on the CPU, so the docs cannot drift.

Which blocks run, and how
-------------------------
* Shell blocks are the fences ```bash, ```sh, ```shell and ```console (in a console block the lines
  that start with ``$ `` are the commands). A bare ``` fence holds output, a file tree or plain text
  and never runs; ``test_bare_blocks_hold_no_commands`` fails if a command hides in one.
* Every shell block runs unless an HTML comment right above its fence (invisible on the rendered page)
  says otherwise. One directive per comment; several comments may be stacked:

  ``<!-- doc-test: skip REASON -->``
      not run: it needs a GPU, torchrun, the internet, hours, or files only the reader has. The
      reason is required; each skipped block is reported as a skipped test with its reason.
  ``<!-- doc-test: dry-run -->``
      every ``crossdistill train`` of the block runs with ``--dry-run`` (the paper recipes), and a
      ``torchrun [its options] -m crossdistill ...`` line runs as ``crossdistill ...``.
  ``<!-- doc-test: set KEY=VALUE ... -->``
      the overrides are added to every ``crossdistill train`` of the block (tiny settings: one epoch,
      a data subset), after the block's own.
  ``<!-- doc-test: output -->`` (above a bare block)
      every non-empty line of it appears in what the shell block before it printed, with any number
      (a time with any unit) standing for any number, ``...`` for any text and any run of spaces
      for any other.

* The blocks of one file run in order in one temporary working directory (never the checkout), so a
  block can use what an earlier one made (train a run, then export it). That directory starts with
  copies of what the docs name from the repository root (``configs/``, ``src/crossdistill/recipes/``),
  ``demo_runs/`` as ``crossdistill demo`` leaves it (cut to one epoch on 96 images, made once per
  session) and ``my_run.yaml``, the docs' name for the reader's own run config (a tiny digits run into
  ``runs/my-run``).
* Every ``crossdistill ...`` runs in this process through ``crossdistill.cli.main`` (no interpreter start,
  no torch import per command), also those started by a block that uses the shell (a loop, a
  here-document, ``$VAR``): such a block runs in ``bash -e``, where ``crossdistill`` hands its
  arguments to this process and ``python`` is this interpreter. ``python ...`` runs in a subprocess
  with this crossdistill on its path. A command that is neither ``crossdistill``, ``python`` nor (in a
  dry-run block) ``torchrun`` fails the test: run it, or mark the block skipped with the reason.
* docs/TESTING.md explains the same for those who write docs.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import crossdistill
from crossdistill.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COPIED = ("configs", "src/crossdistill/recipes")
TINY_DEMO = ["data.train_subset=96", "data.eval_subset=40"]
MY_RUN_YAML = """\
# my_run.yaml: what the docs call the reader's own run config; here a tiny digits run
student: {name: test_resnet}
teacher: {name: test_vit, kwargs: {img_size: 32, patch_size: 8}}
method: rsd
data: {dataset: digits, img_size: 32, train_subset: 96, eval_subset: 40, num_workers: 0, hflip: 0.0}
optim: {opt: adamw, lr: 0.002}
train: {epochs: 1, batch_size: 32, device: cpu, output_dir: runs, run_name: my-run, tensorboard: false}
"""
MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\S*)")
SHELL_WORDS = {"for", "in", "do", "done", "if", "then", "else", "fi", "while"}
COMMAND_WORDS = ("crossdistill", "python", "torchrun", "pip", "make", "srun", "sbatch", "git", "curl", "tar")


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None
    dry_run: bool = False
    overrides: list[str] = field(default_factory=list)
    output: bool = False  # a bare block marked `output`
    expected: list[str] = field(default_factory=list)  # lines the run must print (from an output block after it)

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS


def parse_doc(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, each with the doc-test directives written above it."""
    doc = str(path.relative_to(ROOT))
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    directives: list[str] = []
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i].strip())
        fence = FENCE.match(lines[i])
        if marker:
            directives.append(marker.group(1))
        elif fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            block = Block(doc, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n")
            for directive in directives:
                apply_directive(block, directive)
            blocks.append(block)
            directives = []
            i = end
        else:
            assert not directives, f"{doc}:{i + 1}: a doc-test comment must be right above a fence"
        i += 1
    attach_outputs(blocks)
    return blocks


def apply_directive(block: Block, directive: str) -> None:
    word, _, rest = directive.partition(" ")
    where = f"{block.name}: <!-- doc-test: {directive} -->"
    if word == "skip":
        assert rest.strip(), f"{where}: say why the block is not run"
        block.skip = rest.strip()
    elif word == "dry-run" and not rest:
        block.dry_run = True
    elif word == "set" and rest:
        assert all("=" in item for item in rest.split()), f"{where}: set takes KEY=VALUE overrides"
        block.overrides += rest.split()
    elif word == "output" and not rest:
        assert not block.is_shell, f"{where}: `output` goes above the bare block that shows the output"
        block.output = True
    else:
        raise AssertionError(f"{where}: unknown directive (skip REASON, dry-run, set KEY=VALUE ..., output)")


def attach_outputs(blocks: list[Block]) -> None:
    for i, block in enumerate(blocks):
        if not block.output:
            continue
        ran = [b for b in blocks[:i] if b.is_shell]
        assert ran and not ran[-1].skip, f"{block.name}: an output block needs a shell block that runs before it"
        ran[-1].expected += [line for line in block.text.splitlines() if line.strip()]


ALL_BLOCKS = [block for path in DOCS for block in parse_doc(path)]
SHELL_BLOCKS = [block for block in ALL_BLOCKS if block.is_shell]


# --- reading a block's commands ---------------------------------------------------------------------


def logical_lines(block: Block) -> list[str]:
    """The block's command lines: console prompts stripped, backslash continuations joined."""
    raw = block.text.splitlines()
    if block.lang == "console":
        raw = [line[2:] for line in raw if line.startswith("$ ")]
    joined, pending = [], ""
    for line in raw:
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        joined.append(pending + line)
        pending = ""
    return [line for line in joined if line.strip() and not line.lstrip().startswith("#")]


def uses_the_shell(block: Block) -> bool:
    for line in logical_lines(block):
        words = shlex.split(line, comments=True)
        if "$" in line or "<<" in line or (words and (words[0] in SHELL_WORDS or "=" in words[0])):
            return True
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        if any(token and set(token) <= set("();<>|&") for token in lexer):
            return True
    return False


def without_heredocs(text: str) -> str:
    """The text with the bodies of here-documents (``<<'EOF'`` ... ``EOF``) left out."""
    out, end = [], None
    for line in text.splitlines():
        if end is not None:
            end = None if line.strip() == end else end
            continue
        out.append(line)
        here = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if here:
            end = here.group(1)
    return "\n".join(out)


def commands_named(block: Block) -> list[str]:
    """The program each simple command of a shell-syntax block starts with (shell keywords skipped)."""
    names = []
    text = without_heredocs(block.text).replace("\\\n", " ")
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        at_start, in_for, redirected = True, False, False
        for token in lexer:
            if in_for:  # for NAME in WORDS; do
                in_for = token != "do"
            elif redirected:  # the file or here-document word after < << >
                redirected = False
            elif set(token) <= set("<>&") and set(token) & set("<>"):
                redirected = True
            elif token == "for":
                in_for = True
            elif set(token) <= set("();<>|&") or token in ("do", "then", "else"):
                at_start = True
            elif at_start and token not in SHELL_WORDS and not re.match(r"^\w+=", token):
                names.append(token)
                at_start = False
    return names


def check_runnable(block: Block) -> None:
    if uses_the_shell(block):
        allowed = {"crossdistill", "python"}
        names = commands_named(block)
    else:
        allowed = {"crossdistill", "python"} | ({"torchrun"} if block.dry_run else set())
        names = [shlex.split(line, comments=True)[0] for line in logical_lines(block)]
    unknown = sorted(set(names) - allowed)
    assert not unknown, (
        f"{block.name} runs {', '.join(unknown)}: make it a crossdistill or python command, or mark the block "
        "<!-- doc-test: skip REASON --> (torchrun: <!-- doc-test: dry-run --> in a recipe block)"
    )


# --- running ----------------------------------------------------------------------------------------


def train_extra(block: Block) -> list[str]:
    return ["--dry-run"] * block.dry_run + block.overrides


def crossdistill_argv(block: Block, words: list[str]) -> list[str]:
    if words[0] == "torchrun":
        words = words[words.index("-m") + 1 :]
        assert words[0] == "crossdistill", f"{block.name}: torchrun runs something other than crossdistill"
    return words[1:]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment, with this crossdistill first on the Python path."""
    package_root = str(Path(crossdistill.__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": python_path}


CROSSDISTILL_SHIM = """\
import json, os, socket, sys
with socket.socket(socket.AF_UNIX) as server:
    server.connect(os.environ["DOC_TEST_SOCKET"])
    server.sendall(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}).encode() + b"\\n")
    reply = json.loads(server.makefile().read())
sys.stdout.write(reply["printed"])
sys.exit(reply["code"])
"""


def write_shims(folder: Path) -> Path:
    """``python`` (this interpreter) and ``crossdistill`` (a client that has the test process run the command)."""
    folder.mkdir(exist_ok=True)
    (folder / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (folder / "crossdistill").write_text(f"#!{sys.executable}\n{CROSSDISTILL_SHIM}")
    for shim in folder.iterdir():
        shim.chmod(0o755)
    return folder


def run_crossdistill(block: Block, argv: list[str], capsys) -> tuple[int, str]:
    """``crossdistill ARGV`` in this process (no interpreter start, no torch import): exit code, what it printed."""
    capsys.readouterr()
    code = main(argv + train_extra(block) if argv[:1] == ["train"] else argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def run_in_bash(block: Block, workdir: Path, capsys) -> tuple[int, str]:
    """The block as a bash script; each ``crossdistill`` it starts is run by this process, in its main thread
    (the command installs signal handlers), while bash waits for the answer."""
    script = block.text if block.lang != "console" else "\n".join(logical_lines(block)) + "\n"
    shims = write_shims(workdir.parent / "shims")
    address = str(workdir.parent / "crossdistill.sock")
    log = workdir.parent / "bash.log"
    env = child_env(DOC_TEST_SOCKET=address, PATH=f"{shims}{os.pathsep}{os.environ.get('PATH', '')}")
    with socket.socket(socket.AF_UNIX) as listener, log.open("w+") as output:
        listener.bind(address)
        listener.listen()
        listener.settimeout(0.1)
        bash = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", script], cwd=workdir, env=env, stdout=output, stderr=output
        )
        try:
            while bash.poll() is None:
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                with connection, connection.makefile("rw") as stream:
                    request = json.loads(stream.readline())
                    with pytest.MonkeyPatch.context() as patch:
                        patch.chdir(request["cwd"])
                        code, text = run_crossdistill(block, request["argv"], capsys)
                    stream.write(json.dumps({"code": code, "printed": text}))
        finally:
            if bash.poll() is None:
                bash.kill()
                bash.wait()
            os.unlink(address)
        output.seek(0)
        printed = output.read()
    return bash.returncode, printed


def run_block(block: Block, workdir: Path, capsys) -> str:
    """Run the block's commands in ``workdir``; what they printed. Fails on the first command that fails."""
    check_runnable(block)
    if uses_the_shell(block):
        code, printed = run_in_bash(block, workdir, capsys)
        assert code == 0, f"{block.name} failed (exit {code}):\n{block.text}\n{printed}"
        return printed
    printed = ""
    for line in logical_lines(block):
        words = shlex.split(line, comments=True)
        if words[0] == "python":
            done = subprocess.run(
                [sys.executable, *words[1:]], cwd=workdir, env=child_env(), capture_output=True, text=True, timeout=600
            )
            code, text = done.returncode, done.stdout + done.stderr
        else:
            code, text = run_crossdistill(block, crossdistill_argv(block, words), capsys)
        printed += text
        assert code == 0, f"{block.name}: `{line.strip()}` exited {code}:\n{text}"
    return printed


NUMBER = r"(?<![A-Za-z_.\d])[-+]?\d+(?:\.\d+)*(?:e[-+]?\d+)?"
"""A number standing alone (``0.365``, ``1e-06``, ``2.82M``, ``-0.1``), not in a name (``layer3``, ``blocks.1``)."""
DURATION = NUMBER + r" ?(?:s|min|h)\b"
"""A time with its unit (``29s``, ``53.0 s``, ``5.0 min``): the unit changes with the time."""


def line_pattern(line: str) -> re.Pattern:
    """A doc's example line as a regex: numbers (times with their unit) stand for any number (time), ``...`` for
    any text, runs of spaces for runs of spaces."""
    parts = []
    for piece in re.split(rf"(\.\.\.|\s+|{DURATION}|{NUMBER})", line.strip()):
        if piece == "...":
            parts.append(".*")
        elif piece.isspace():
            parts.append(r"\s+")
        elif piece and re.fullmatch(DURATION, piece):
            parts.append(r"[-+]?\d+(?:\.\d+)*\s?(?:s|min|h)")
        elif piece and re.fullmatch(NUMBER, piece):
            parts.append(r"[-+]?\d+(?:\.\d+)*(?:e[-+]?\d+)?")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts))


def missing_lines(expected: list[str], printed: str) -> list[str]:
    lines = printed.splitlines()
    return [want for want in expected if not any(line_pattern(want).fullmatch(got.strip()) for got in lines)]


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> Path:
    """``demo_runs/`` as ``crossdistill demo`` leaves it, on one epoch of 96 training images."""
    from crossdistill.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run_demo(output_dir="demo_runs", epochs=1, out=io.StringIO(), overrides=TINY_DEMO)
    return root / "demo_runs"


WORKDIRS: dict[str, Path] = {}


def workdir_for(doc: str, request, tmp_path_factory) -> Path:
    """One working directory per doc, shared by its blocks (they run in order)."""
    if doc not in WORKDIRS:
        root = tmp_path_factory.mktemp(doc.replace("/", "_")) / "work"
        root.mkdir()
        for name in COPIED:
            shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        (root / "my_run.yaml").write_text(MY_RUN_YAML)
        if "demo_runs/" in (ROOT / doc).read_text():
            shutil.copytree(request.getfixturevalue("demo_runs"), root / "demo_runs")
        WORKDIRS[doc] = root
    return WORKDIRS[doc]


FAILED_DOCS: set[str] = set()


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.name)
def test_doc_shell_block(block, request, tmp_path_factory, capsys, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.name} not run: {block.skip}")
    if block.doc in FAILED_DOCS:
        pytest.skip(f"{block.name} not run: an earlier block of {block.doc} failed")
    workdir = workdir_for(block.doc, request, tmp_path_factory)
    monkeypatch.chdir(workdir)
    FAILED_DOCS.add(block.doc)
    printed = run_block(block, workdir, capsys)
    absent = missing_lines(block.expected, printed)
    assert not absent, f"{block.name}: the doc's example output has lines the command no longer prints:\n" + (
        "\n".join(absent) + "\n--- printed:\n" + printed
    )
    FAILED_DOCS.discard(block.doc)


# --- the rules themselves ---------------------------------------------------------------------------


def test_the_docs_have_shell_blocks_and_most_of_them_run():
    assert {b.doc for b in SHELL_BLOCKS} >= {"README.md", "docs/ANALYSIS.md", "docs/REPRODUCE.md"}
    ran = [b for b in SHELL_BLOCKS if not b.skip]
    assert len(ran) >= 10, [b.name for b in ran]
    assert any(b.expected for b in ran), "no example output is checked"


def test_bare_blocks_hold_no_commands():
    """A command in a bare fence would never run: the fence must say ```bash."""
    for block in ALL_BLOCKS:
        if block.lang == "" and not block.output:
            first_words = {line.split()[0] for line in block.text.splitlines() if line.strip()}
            assert not first_words & set(COMMAND_WORDS), f"{block.name}: commands in a bare ``` block; fence it ```bash"


def test_every_block_that_runs_runs_only_what_the_test_can_run():
    problems = []
    for block in SHELL_BLOCKS:
        try:
            if not block.skip:
                check_runnable(block)
        except AssertionError as err:
            problems.append(str(err))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<!-- doc-test: skip -->\n```bash\nmake demo\n```\n", "say why"),
        ("<!-- doc-test: run fast -->\n```bash\nls\n```\n", "unknown directive"),
        ("<!-- doc-test: set epochs -->\n```bash\nls\n```\n", "KEY=VALUE"),
        ("<!-- doc-test: dry-run -->\n\ntext\n```bash\nls\n```\n", "right above a fence"),
        ("```bash\nmake demo\n```\n<!-- doc-test: output -->\n```\nok\n```\n", None),
        (
            "<!-- doc-test: skip no make here -->\n```bash\nmake demo\n```\n<!-- doc-test: output -->\n```\nok\n```\n",
            "needs a shell block that runs",
        ),
    ],
)
def test_the_directives_are_checked(tmp_path, monkeypatch, text, problem):
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    if problem is None:
        (block, _) = parse_doc(doc)
        assert block.expected == ["ok"]
        with pytest.raises(AssertionError, match="runs make"):
            check_runnable(block)
    else:
        with pytest.raises(AssertionError, match=problem):
            parse_doc(doc)


def test_shell_syntax_is_told_from_plain_commands():
    def block(text: str) -> Block:
        return Block("x.md", 1, "bash", textwrap.dedent(text))

    plain = block("crossdistill train --config a.yaml \\\n    train.epochs=2   # a comment\npython b.py --x 'a|b'\n")
    assert not uses_the_shell(plain) and logical_lines(plain)[0].split()[:2] == ["crossdistill", "train"]
    loop = block("for s in 1 2; do\n  crossdistill train --config a.yaml train.seed=$s\ndone\ncrossdistill report r\n")
    assert uses_the_shell(loop) and commands_named(loop) == ["crossdistill", "crossdistill"]
    heredoc = block("python - <<'EOF'\nimport os\nos.system('make')\nEOF\n")
    assert uses_the_shell(heredoc) and commands_named(heredoc) == ["python"]
    assert commands_named(block("A=1 pip install x && make demo | tee log\n")) == ["pip", "make", "tee"]


def test_example_lines_match_with_any_numbers_and_ellipses():
    printed = "teacher \\ student      blocks.1    pre-logits\nlayer4    0.412   0.377\nrsd: CKA 0.5, mean 0.3, x y"
    assert (
        missing_lines(["layer4  0.1  0.2", "rsd: CKA 0.365, ...", "teacher \\ student blocks.1 pre-logits"], printed)
        == []
    )
    assert missing_lines(["layer3  0.1  0.2"], printed) == ["layer3  0.1  0.2"]
    assert missing_lines(["layer4  0.1"], printed) == ["layer4  0.1"]  # whole lines, not prefixes
    assert missing_lines(["timm 1.0.31, 2.82M +99k, 29s | 5.0 min |"], "timm 1.0.29, 0.8M +120k, 131s | 3.2 s |") == []


# --- docs/ERRORS.md: the messages of the simplest inputs, as the CLI prints them now -----------------

ERRORS_MD = ROOT / "docs" / "ERRORS.md"
CHECKED_ERROR_INPUTS = [
    "student.name=resnet181",
    "method=rsdd",
    "data.dataset=cifar1000",
    "train.epoch=3",
    "method_args.kapa=0.1",
    "train.batch_size=abc",
    "method_args.kappa=-1",
    "method_args.gamma=0",
    "train.amp=fp8",
    "data.val_fraction=1.5",
]


def errors_md_message(override: str) -> str:
    for line in ERRORS_MD.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] == f"`{override}`":
            return re.fullmatch(r"`(.*)`", cells[1]).group(1)
    raise AssertionError(f"docs/ERRORS.md has no row for `{override}`")


@pytest.mark.parametrize("override", CHECKED_ERROR_INPUTS)
def test_errors_md_shows_the_message_the_cli_prints(override, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_run.yaml").write_text(MY_RUN_YAML)
    assert main(["train", "--config", "my_run.yaml", override]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("crossdistill: error: ")
    message = printed.removeprefix("crossdistill: error: ")
    assert not missing_lines([errors_md_message(override)], message), (
        f"docs/ERRORS.md, `{override}`: the CLI now prints\n{message}"
    )
    assert not (tmp_path / "runs").exists()
