from sqlalchemy import create_engine, inspect

from app import migrate
from models import Base
from tests.conftest import fresh_database


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_and_downgrade_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate.upgrade(url)
    assert _tables(url) == set(Base.metadata.tables)
    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    migrate.upgrade(url)
    assert _tables(url) == set(Base.metadata.tables)


def test_upgrade_and_downgrade_on_postgres(pg_url):
    # pg_url proves the server is up; take a private database to go up, down and up.
    with fresh_database("rr_migrations", migrated=False) as url:
        migrate.upgrade(url)
        assert _tables(url) == set(Base.metadata.tables)
        migrate.downgrade(url, "base")
        assert _tables(url) == set()
        migrate.upgrade(url)
        assert _tables(url) == set(Base.metadata.tables)


def test_models_match_migrations(pg_url):
    """Autogenerate finds nothing to do: the migrations build exactly the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(pg_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def _backfill_keeps_trained_problems_on_train(url: str) -> None:
    """Problems stored before the split get the import's hash split, except one
    the flywheel already sampled for training, which must stay `train`."""
    from sqlalchemy import text

    from models.problem import split_for

    migrate.upgrade(url, "3ca71c43b82e")
    task_ids = [f"HumanEval/{i}" for i in range(12)]
    engine = create_engine(url)
    with engine.begin() as connection:
        for task_id in task_ids:
            connection.execute(
                text(
                    "INSERT INTO problems (source, task_id, language, prompt, tests, created_at)"
                    " VALUES ('humaneval', :task_id, 'python', 'p', 't', CURRENT_TIMESTAMP)"
                ),
                {"task_id": task_id},
            )
        held_out = [t for t in task_ids if split_for("humaneval", t, 0.5) == "eval"]
        trained = held_out[0]  # would be held out, but training has sampled it
        connection.execute(
            text(
                "INSERT INTO candidates (problem_id, code, content_hash, origin, created_at)"
                " SELECT id, 'x', 'h', 'generator', CURRENT_TIMESTAMP FROM problems"
                " WHERE task_id = :task_id"
            ),
            {"task_id": trained},
        )
    migrate.upgrade(url)
    with engine.connect() as connection:
        stored = dict(connection.execute(text("SELECT task_id, split FROM problems")).all())
    engine.dispose()
    assert held_out, "the hash put none of 12 problems on the eval side"
    assert stored[trained] == "train"
    assert {t for t, split in stored.items() if split == "eval"} == set(held_out) - {trained}


def test_split_backfill_on_sqlite(tmp_path):
    _backfill_keeps_trained_problems_on_train(f"sqlite:///{tmp_path / 'm.db'}")


def test_split_backfill_on_postgres(pg_url):
    with fresh_database("rr_split", migrated=False) as url:
        _backfill_keeps_trained_problems_on_train(url)
