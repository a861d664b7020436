"""an index for the job list's order (created_at, then id, newest first): without it every
`GET /v1/jobs` page scanned and sorted the whole jobs table, and one filtered by status
sorted every job of that status (issue 9: list p99 at 10,000 jobs)

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_created_at_id', 'jobs', ['created_at', 'id'], unique=False)
    op.create_index('ix_jobs_status_created_at_id', 'jobs', ['status', 'created_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_jobs_status_created_at_id', table_name='jobs')
    op.drop_index('ix_jobs_created_at_id', table_name='jobs')
