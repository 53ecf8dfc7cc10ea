"""The code blocks of a Markdown file, and how the README test runs them.

Fenced blocks are run by their info string:

- ```` ```sh ```` and ```` ```python ````: run, in order, in one shell session (variables set in one
  block are there in the next, as in a terminal); Python blocks with the checkout's ``.venv``.
  A failing command fails the test.
- ```` ```sh server ````: a command that keeps running (a server): started in the background,
  and the next block runs once the port it names answers.
- ```` ```output ```` right after a block: what that block prints; ``...`` stands for any text.
- ```` ```sh skip=<reason> ````: not run, for a reason the test knows (``REASONS``).

Blocks of any other kind (```` ``` ```` for formulas, ```` ```text ````) are prose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
RUNNABLE = ("sh", "python")

REASONS = {
    "docker": "needs a Docker engine, which CI does not have (the compose file is checked statically, and "
    "tests/test_topology.py and tests/test_redis_acl.py run its topology and ACL as processes)",
    "self": "the test command itself (CI runs it; running it from a test would recurse)",
    "bench": "the full benchmark takes about ten minutes; tests/test_bench.py runs its --quick form",
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    mode: str  # "run", "server", "skip" or "prose"
    reason: str | None
    body: str
    output: str | None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip().split()
        found.append((m, info[0] if info else "", info[1:]))
    out: list[Block] = []
    for i, (m, lang, opts) in enumerate(found):
        if lang == "output":
            continue
        line = text.count("\n", 0, m.start()) + 1
        output = None
        if i + 1 < len(found) and found[i + 1][1] == "output" and not text[m.end() : found[i + 1][0].start()].strip():
            output = found[i + 1][0].group("body")
        mode, reason = ("run" if lang in RUNNABLE else "prose"), None
        for opt in opts:
            if opt == "server":
                mode = "server"
            elif opt.startswith("skip="):
                mode, reason = "skip", opt.removeprefix("skip=")
            else:
                raise ValueError(f"{path.name}:{line}: unknown block option {opt!r}")
        out.append(Block(path, line, lang, mode, reason, m.group("body"), output))
    return out


def output_matches(expected: str, got: str) -> bool:
    """Whether ``got`` is ``expected``, where ``...`` in ``expected`` stands for any text (trailing spaces aside)."""

    def norm(s: str) -> str:
        return "\n".join(line.rstrip() for line in s.strip().splitlines())

    parts = [re.escape(p) for p in norm(expected).split("...")]
    return re.fullmatch(".*?".join(parts), norm(got), re.S) is not None
