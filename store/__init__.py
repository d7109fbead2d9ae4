"""The job store: SQLAlchemy models, Alembic migrations, repository functions, artifact files.

The database row is the truth about a job; the queue is only a wake-up call. Imports no torch and no
web or queue framework.
"""
