"""The PostgreSQL backend: the store (store.py) and the parts it is built from."""

from app.storage.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
