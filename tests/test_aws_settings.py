"""config.example.toml documents every `[providers.aws]` key the adapter reads (issue 10, item
12), and the documented example values are accepted by the settings model."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from adapters.aws.settings import AwsSettings

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


def _aws_section() -> list[str]:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [providers.aws]")
    out = []
    for line in lines[start + 1:]:
        if re.match(r"#? ?\[", line):
            break
        out.append(line)
    return out


def test_every_aws_key_is_documented() -> None:
    documented = {m.group(1) for line in _aws_section() if (m := re.match(r"# ([a-z_]+) = ", line))}
    assert set(AwsSettings.model_fields) == documented


def test_the_documented_examples_are_valid() -> None:
    table = {}
    for line in _aws_section():
        m = re.match(r"# ([a-z_]+ = .*?)(\s{2,}#.*)?$", line)
        if m:
            table.update(tomllib.loads(m.group(1)))
    settings = AwsSettings.model_validate(table)
    assert settings.subnet_tag == "gpuhop" and settings.rebalance_notices is False
