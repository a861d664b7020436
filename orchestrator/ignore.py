"""Which files of a job's working directory are uploaded: the subset of gitignore's pattern
language people actually write, read from `.gitignore` and `.gpuhopignore` files at every level.

It exists because `gpuhop submit` uploads the job's directory (orchestrator.workdir), and what a
user keeps out of git (checkpoints, datasets, virtualenvs) is almost always what must stay off the
upload too. Supported, as git has it: blank lines and `#` comments, `!` negation (the last matching
rule wins; a file under an excluded directory cannot be re-included), a trailing `/` for
directories only, a leading or middle `/` anchoring the pattern to its file's directory (else it
matches a name at any depth), `*` and `?` (never across `/`), `[...]` classes, and `**` (`**/x`,
`x/**`, `a/**/b`). Rules of a deeper directory's files come after, so they override; when the
root lies inside a git repository, the ignore files of its directories above the root apply too,
as git would apply them. Not
supported: git's global excludes and `core.excludesFile`. Pure: no I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORE_FILES = (".gitignore", ".gpuhopignore")  # read in this order: .gpuhopignore has the last word


@dataclass(frozen=True)
class Rule:
    base: str  # the directory of the file the rule came from, relative to the root ("" = root)
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool
    prefix: str = ""  # a rule from above the root (the enclosing git repository): the root's path there

    def matches(self, path: str, is_dir: bool) -> bool:
        """Does the rule match `path` (relative to the root, '/'-separated)?"""
        if self.dir_only and not is_dir:
            return False
        path = self.prefix + path
        if self.base:
            if not path.startswith(self.base + "/"):
                return False
            path = path[len(self.base) + 1:]
        target = path if self.anchored else path.rpartition("/")[2]
        return self.regex.fullmatch(target) is not None


def _translate(pattern: str) -> str:
    """A gitignore glob as a regular expression (matched whole)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i) and (i == 0 or pattern[i - 1] == "/"):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == n:
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def parse(text: str, base: str = "", prefix: str = "") -> list[Rule]:
    """The rules of one ignore file found in directory `base` (relative to the root), or, with
    `prefix` (the root's path below that file's directory, ending in '/'), above the root."""
    rules = []
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        stripped = line.rstrip(" ")
        if stripped.endswith("\\") and len(stripped) < len(line):
            stripped += " "  # "foo\ " keeps its escaped trailing space
        line = stripped
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/")
        try:
            regex = re.compile(_translate(line), re.DOTALL)
        except re.error:
            continue  # git ignores a pattern it cannot read; so do we
        rules.append(Rule(base, regex, negate, dir_only, anchored, prefix))
    return rules


def ignored(rules: list[Rule], path: str, is_dir: bool) -> bool:
    """Is `path` excluded by `rules` (in order, the last match wins)? `.git` never travels."""
    if path.rpartition("/")[2] == ".git":
        return True
    result = False
    for rule in rules:
        if rule.negate == result and rule.matches(path, is_dir):
            result = not rule.negate
    return result
