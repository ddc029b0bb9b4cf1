"""The SQLite backend: the store (store.py) and the parts it is built from."""

from app.storage.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore"]
