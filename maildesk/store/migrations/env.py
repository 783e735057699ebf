"""Alembic environment: migrations run on the engine that maildesk hands over."""

from alembic import context

from maildesk.store.models import SQLModel

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
