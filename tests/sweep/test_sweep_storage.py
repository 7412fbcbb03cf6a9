"""Opening the shared study storage when workers start together (the schema-creation race)."""

from __future__ import annotations

import optuna
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from samflow.sweep import storage
from samflow.sweep.spec import SweepError


def fake_storage(monkeypatch, failures: list[Exception]) -> list[int]:
    calls: list[int] = []

    def rdb_storage(url, **kwargs):
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "opened"

    monkeypatch.setattr(optuna.storages, "RDBStorage", rdb_storage)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    return calls


def race(message: str) -> IntegrityError:
    return IntegrityError(message, params=None, orig=Exception(message))


def test_a_worker_that_loses_the_schema_race_opens_the_storage_again(monkeypatch):
    calls = fake_storage(monkeypatch, [race("UNIQUE constraint failed: alembic_version.version_num")])
    assert storage.open_storage("sqlite:///study.db") == "opened" and len(calls) == 2


def test_other_database_errors_are_one_line_at_once(monkeypatch):
    error = OperationalError("unable to open database file", params=None, orig=Exception("no such dir"))
    calls = fake_storage(monkeypatch, [error])
    with pytest.raises(SweepError, match=r"--storage sqlite:///x/study.db: cannot open it: .*unable to open"):
        storage.open_storage("sqlite:///x/study.db")
    assert len(calls) == 1


def test_a_race_that_never_ends_gives_up_after_the_last_try(monkeypatch):
    calls = fake_storage(monkeypatch, [race("alembic_version") for _ in range(storage.STORAGE_TRIES)])
    with pytest.raises(SweepError, match="cannot open it"):
        storage.open_storage("sqlite:///study.db")
    assert len(calls) == storage.STORAGE_TRIES
