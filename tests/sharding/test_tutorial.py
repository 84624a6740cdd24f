"""The tutorial's Python snippets run, and the values in their comments are real."""

from __future__ import annotations

import ast
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "tutorials" / "sharding.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
# A top-level `expr  # literal[: explanation]` line states the value of `expr`.
CLAIM = re.compile(r"^(?P<expr>(?!print\()[A-Za-z_{][^#=]*?)\s+#\s(?P<value>[\[{('0-9].*)$")
# A top-level `print(expr)  # text` line states what it prints.
PRINT = re.compile(r"^print\((?P<expr>.*)\)\s+#\s(?P<text>.*)$")


def _literal(text: str) -> object:
    for end in range(len(text), 0, -1):
        try:
            return ast.literal_eval(text[:end])
        except (SyntaxError, ValueError):
            continue
    raise AssertionError(f"no literal in {text!r}")


def test_tutorial_snippets_run_and_match_their_comments() -> None:
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 6
    claims: list[tuple[object, object, str]] = []

    def check(value: object, comment: str, line: str) -> None:
        claims.append((value, _literal(comment), line))

    def check_print(value: object, text: str, line: str) -> None:
        claims.append((str(value), text, line))

    namespace: dict[str, object] = {
        "__check": check,
        "__check_print": check_print,
        "print": lambda *args: None,
    }
    for block in blocks:
        lines = []
        for line in block.splitlines():
            if match := CLAIM.match(line):
                line = f"__check({match['expr']}, {match['value']!r}, {line!r})"
            elif match := PRINT.match(line):
                line = f"__check_print({match['expr']}, {match['text']!r}, {line!r})"
            lines.append(line)
        exec("\n".join(lines), namespace)
    assert len(claims) >= 14
    for value, expected, line in claims:
        assert value == expected, line
