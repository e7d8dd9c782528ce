"""README.md's code blocks as tests (issue 30): extraction, markers, validation, execution.

Marker convention: a block CI cannot run carries a one-line HTML comment directly above its
opening fence (blank lines between are allowed), invisible on GitHub::

    <!-- needs: gpu, data -- an optional note for readers after " -- " -->

Needs (``NEEDS``) name what CI lacks. A marked block is not run but validated: Python is
compiled, every shell command parsed (``finegrain`` lines by the CLI's own parsers, recipes and
overrides resolved, ``eval --tasks`` checked; ``python`` scripts, modules, pytest paths and
markers, and pip extras checked to exist). A block whose only need is ``flickr8k`` runs when
``../shared/data/flickr8k`` exists. Unmarked ``bash`` / ``python`` blocks run as written, in
order; ``json`` blocks must parse; fences without a language are prose.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NEEDS = {
    "gpu": "a CUDA device",
    "cluster": "several GPUs or nodes (torchrun)",
    "flickr8k": "../shared/data/flickr8k (runs when present if this is the only need)",
    "data": "a dataset, manifest or shards that are not in the repository",
    "model-file": "pretrained weights, an MLLM or a detector as local files",
    "time": "longer than a test may take (the full demo, a ViT-B/16 recipe)",
    "network": "a package index (pip install)",
    "suite": "runs the test suite itself (it would recurse)",
    "server": "a long-running process (tensorboard)",
}
CODE = ("bash", "sh", "shell", "python")
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARK = re.compile(r"^<!--\s*needs:\s*(?P<needs>.*?)\s*(?:--\s.*)?-->$")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
SHELL_BUILTINS = {"cd", "mkdir", "ls", "cat", "echo", "export", "."}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    needs: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"

    def runnable(self, flickr8k: bool) -> bool:
        if self.lang not in CODE:
            return False
        return not self.needs or (flickr8k and set(self.needs) == {"flickr8k"})


def _marker(lines: list[str], fence: int) -> tuple[int, tuple[str, ...]] | None:
    """(line index, needs) of the marker above ``lines[fence]``, if any."""
    i = fence - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    m = MARK.match(lines[i].strip()) if i >= 0 else None
    if m is None:
        return None
    needs = tuple(n.strip() for n in m["needs"].split(",") if n.strip())
    unknown = [n for n in needs if n not in NEEDS]
    if not needs or unknown:
        raise ValueError(f"README.md:{i + 1}: unknown need {unknown or '(none)'}; known: "
                         f"{', '.join(NEEDS)} (tests/helpers/readme.py)")  # fmt: skip
    return i, needs


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of a README text with its language and needs, in order; a marker
    that sits above no block, an unknown need or an unclosed fence raise ``ValueError``."""
    lines = text.splitlines()
    blocks, used, i = [], set(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: the code fence is never closed")
        marker = _marker(lines, i)
        if marker is not None:
            used.add(marker[0])
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(i + 1, m[1].lower(), code, marker[1] if marker else ()))
        i = end + 1
    orphans = [k + 1 for k, s in enumerate(lines) if MARK.match(s.strip()) and k not in used]
    if orphans:
        raise ValueError(f"README.md:{orphans[0]}: a needs marker must sit right above a fence")
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block as argv lists: continuation lines joined, comments
    dropped, split at ``&& || ; | &``, redirections and leading ``VAR=value`` removed."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        current: list[str] = []
        tokens = iter(lex)
        for tok in tokens:
            if tok in SEPARATORS:
                commands.append(current)
                current = []
            elif tok in REDIRECTS:
                next(tokens, None)
            else:
                current.append(tok)
        commands.append(current)
    commands = [c for c in commands if c]
    for c in commands:
        while c and re.match(r"^[A-Za-z_]\w*=", c[0]):
            c.pop(0)
    return [c for c in commands if c]


def pyproject_extras() -> set[str]:
    """The optional-dependency groups of pyproject.toml (``pip install -e ".[dev]"``)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def pytest_markers() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("markers = [", 1)[1].split("]", 1)[0]
    return set(re.findall(r'"(\w+):', block))


class CommandError(AssertionError):
    """A README command that would fail: names the block and the reason."""


def check_finegrain(argv: list[str]) -> None:
    """Parse a finegrain command line with the CLI's own parsers (nothing runs)."""
    import contextlib
    import io

    from finegrain.cli import parse_command
    from finegrain.config import ConfigError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse_command(argv)
    except SystemExit as e:
        if e.code not in (0, None):  # --help exits 0
            raise CommandError(f"finegrain {shlex.join(argv)}: {err.getvalue().strip()}") from None
    except (ValueError, ConfigError) as e:
        raise CommandError(f"finegrain {shlex.join(argv)}: {e}") from None


def _check_pytest(args: list[str]) -> None:
    if "-n" in args and importlib.util.find_spec("xdist") is None:
        raise CommandError("pytest -n needs pytest-xdist (the dev extra)")
    if "-m" in args:
        marks = set(re.findall(r"\w+", args[args.index("-m") + 1])) - {"not", "and", "or"}
        if marks - pytest_markers():
            raise CommandError(f"pytest -m: unregistered marker(s) {sorted(marks)}")
    for a in args:
        if not a.startswith("-") and ("/" in a or a.endswith(".py")):
            if not (ROOT / a.split("::")[0]).exists():
                raise CommandError(f"pytest: no such test path {a}")


def check_python(args: list[str]) -> None:
    """``python -m MODULE ...`` (the module exists; finegrain.cli parsed; pytest's paths and
    markers) or ``python SCRIPT ...`` (the script is in the repository)."""
    if args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module == "pytest":
            return _check_pytest(rest)
        if importlib.util.find_spec(module) is None:
            raise CommandError(f"python -m {module}: no such module")
        if module == "finegrain.cli":
            check_finegrain(rest)
    elif args and not (ROOT / args[0]).is_file():
        raise CommandError(f"python {args[0]}: no such script in the repository")


def check_command(argv: list[str]) -> None:
    """Validate one README command without running it (``CommandError`` says why not)."""
    prog, args = argv[0], argv[1:]
    if prog == "finegrain":
        check_finegrain(args)
    elif prog in ("python", "python3"):
        check_python(args)
    elif prog == "torchrun":
        if "-m" not in args:
            raise CommandError("torchrun: expected -m finegrain.cli")
        check_python(args[args.index("-m") :])
    elif prog == "pip":
        for extra in re.findall(r"\[([\w,-]+)\]", " ".join(args)):
            unknown = set(extra.split(",")) - pyproject_extras()
            if unknown:
                raise CommandError(f"pip: no extra {sorted(unknown)} in pyproject.toml")
    elif prog == "ruff":
        if args[:1] not in (["check"], ["format"]):
            raise CommandError(f"ruff {shlex.join(args)}: expected check or format")
    elif prog in ("bash", "sh"):
        if not args or not (ROOT / args[0]).is_file():
            raise CommandError(f"{prog} {shlex.join(args)}: no such script in the repository")
    elif prog == "tensorboard":
        if "--logdir" not in args:
            raise CommandError("tensorboard: expected --logdir")
    elif prog not in SHELL_BUILTINS:
        raise CommandError(f"no validator for '{prog}': add one to tests/helpers/readme.py")


def check_block(block: Block) -> None:
    """Parse a block and validate its commands (``CommandError`` naming the README line)."""
    try:
        if block.lang == "python":
            compile(block.code, block.where, "exec")
        elif block.lang in ("bash", "sh", "shell"):
            for argv in shell_commands(block.code):
                check_command(argv)
        elif block.lang == "json":
            json.loads(block.code)
    except (CommandError, SyntaxError, ValueError) as e:
        raise CommandError(f"{block.where} ({block.lang} block): {e}") from None
