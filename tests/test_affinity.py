from __future__ import annotations

from llamacpp_ha._affinity import AffinityTable


def test_entries_expire_after_the_ttl() -> None:
    table = AffinityTable(ttl_s=10, max_entries=10)
    table.set("k", "a", now=100.0)
    assert table.get("k", now=109.0) == "a"
    assert table.get("k", now=111.0) is None
    assert len(table) == 0


def test_the_least_recently_set_entry_is_dropped_at_the_bound() -> None:
    table = AffinityTable(ttl_s=100, max_entries=2)
    table.set("one", "a", now=0)
    table.set("two", "b", now=0)
    table.set("one", "c", now=0)  # refreshes "one"
    table.set("three", "d", now=0)
    assert table.get("two", now=0) is None
    assert table.get("one", now=0) == "c"
    assert len(table) == 2


def test_forget_backend() -> None:
    table = AffinityTable(ttl_s=100, max_entries=10)
    table.set("one", "a")
    table.set("two", "b")
    table.forget_backend("a")
    assert table.get("one") is None
    assert table.get("two") == "b"
