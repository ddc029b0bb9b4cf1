"""`q` is exactly "case-folded q is a substring of case-folded text", index or no index.

The trigram index only narrows the candidates, and it is filled behind the inserts; these
tests compare every answer with a plain Python scan, with the index complete, empty, and
half-filled.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.models import ListQuery, Message, decode_cursor
from app.storage import SQLiteStore

pytestmark = pytest.mark.anyio

ALPHABET = "abcXYZ %_\"'*\\.-ßẞİıΣσςǅ日本😀\n\t"
WORDS = ["hello", "HELLO", "Straße", "STRASSE", "100%", "a_b", 'say "hi"', "Σίσυφος", "日本語"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def corpus(seed: int = 7, size: int = 300) -> list[str | None]:
    rng = random.Random(seed)
    texts: list[str | None] = [None, "", "ab", "%", "_"]
    for _ in range(size):
        parts = [
            rng.choice(WORDS)
            if rng.random() < 0.5
            else "".join(rng.choices(ALPHABET, k=rng.randint(1, 8)))
            for _ in range(rng.randint(1, 5))
        ]
        texts.append(" ".join(parts))
    return texts


async def store_texts(store: SQLiteStore, texts: list[str | None], prefix: str = "t") -> None:
    """One message per text, ids `<prefix>0000`, `<prefix>0001`, ... in order."""
    for i, text in enumerate(texts):
        await store.insert(
            Message.model_validate(
                {
                    "message_id": f"{prefix}{i:04d}",
                    "from": "+15550000001",
                    "to": "+15550000002",
                    "ts": f"2025-01-01T00:00:{i % 60:02d}Z",
                    "text": text,
                }
            )
        )


def oracle(texts: list[str | None], q: str) -> list[str]:
    folded = q.casefold()
    return [
        f"t{i:04d}"
        for i, text in enumerate(texts)
        if text is not None and folded in text.casefold()
    ]


def queries(texts: list[str | None]) -> Iterator[str]:
    rng = random.Random(11)
    yield from [
        "%",
        "_",
        "%%",
        "a_b",
        "0%",
        '"',
        'say "',
        "ss",
        "SS",
        "strasse",
        "ß",
        "i̇",
        "σ",
        "ς",
        "Σίσ",
        "日本",
        "😀",
        " ",
        "\n",
        "xyz",
        "hello",
        "HELLO W",
        "ab",
    ]
    for text in texts:
        if text:
            start = rng.randrange(len(text))
            yield text[start : start + rng.randint(1, 6)]


@pytest.fixture(params=["indexed", "unindexed", "half"])
async def searchable(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[SQLiteStore, list[str | None]]]:
    texts = corpus()
    store = await SQLiteStore.open(str(tmp_path / "search.db"))
    # Keep the writer from indexing on its own, so each state is exactly the one named.
    store._writer.search.automatic = False
    try:
        await store_texts(store, texts)
        if request.param == "indexed":
            await store.index_search()
        elif request.param == "half":
            await store.index_search(limit=len(texts) // 2)
        progress = await store.query("SELECT indexed_through FROM search_progress")
        assert (progress[0][0] == 0) == (request.param == "unindexed")
        yield store, texts
    finally:
        await store.close()


async def search(store: SQLiteStore, q: str) -> tuple[list[str], int]:
    ids: list[str] = []
    query = ListQuery(limit=100, q=q)
    page = await store.list_messages(query)
    total = page.total
    while True:
        ids += [m.message_id for m in page.data]
        if page.next_cursor is None:
            break
        page = await store.list_messages(
            ListQuery(limit=100, q=q, after=decode_cursor(page.next_cursor))
        )
    return sorted(ids), total


async def test_search_matches_a_plain_scan(
    searchable: tuple[SQLiteStore, list[str | None]],
) -> None:
    store, texts = searchable
    checked = 0
    for q in queries(texts):
        ids, total = await search(store, q)
        expected = oracle(texts, q)
        assert ids == expected, q
        assert total == len(expected), q
        checked += 1
    assert checked > 100


async def test_index_progress_is_recorded(tmp_path: Path) -> None:
    store = await SQLiteStore.open(str(tmp_path / "progress.db"))
    try:
        await store_texts(store, [f"word{i}" for i in range(10)], prefix="p")
        await store.index_search()
        rows = await store.query(
            "SELECT indexed_through, (SELECT max(rowid) FROM messages) FROM search_progress"
        )
        assert rows[0][0] == rows[0][1]
        fts = await store.query("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'word'")
        assert fts == [(10,)]
    finally:
        await store.close()


def test_search_equivalence_for_generated_texts(tmp_path: Path) -> None:
    """Hypothesis draws texts and terms; the answer must be the scan's, index or not."""
    text_strategy = st.lists(
        st.one_of(st.none(), st.text(alphabet=ALPHABET, max_size=20)), min_size=1, max_size=12
    )

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        texts=text_strategy,
        q=st.text(alphabet=ALPHABET, min_size=1, max_size=5),
        indexed=st.booleans(),
    )
    def check(texts: list[str | None], q: str, indexed: bool) -> None:
        asyncio.run(run(texts, q, indexed))

    async def run(texts: list[str | None], q: str, indexed: bool) -> None:
        store = await SQLiteStore.open(":memory:")
        try:
            await store_texts(store, texts)
            store._writer.search.automatic = False
            if indexed:
                await store.index_search()
            assert await search(store, q) == (oracle(texts, q), len(oracle(texts, q)))
        finally:
            await store.close()

    check()
