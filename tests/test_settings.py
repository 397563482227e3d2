"""Every setting is documented in the README, and every documented one exists."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from spellbook.settings import Settings


def test_readme_settings_table_matches_the_settings_object():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    documented = set(re.findall(r"`SPELLBOOK_([A-Z_]+)`", readme))
    names = {f.name.upper() for f in fields(Settings)}
    assert names - documented == set(), "settings missing from the README table"
    assert documented - names == set(), "README documents settings that do not exist"


def test_environment_values_are_typed():
    s = Settings.from_env({"SPELLBOOK_PORT": "9000", "SPELLBOOK_BATCHING": "0", "SPELLBOOK_HOST": "0.0.0.0"})
    assert (s.port, s.batching, s.host) == (9000, False, "0.0.0.0")
