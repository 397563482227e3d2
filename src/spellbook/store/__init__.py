"""The store: Spellbook's SQLite database (SPELLBOOK_HOME/spellbook.db) and its numbered migrations."""

from spellbook.store.db import Database, connect, migrate

__all__ = ["Database", "connect", "migrate"]
