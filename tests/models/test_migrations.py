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
