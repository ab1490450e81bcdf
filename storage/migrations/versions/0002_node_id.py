"""Scale-out: which node holds an instance's spool file / a report's SR file; source headers.

``instances.node_id`` and ``reports.node_id`` name the node (its spool, see
``storage.spool.Spool.node_id``) that holds the file: with several nodes on one
PostgreSQL database, a node only scores, reconciles, requeues and deletes its own
instances and only sends its own reports. NULL (rows written before this revision)
belongs to every node until one claims it for scoring (the claim stamps it), which is
right for the single-node deployments that existed then. ``verdicts.source_header`` is the source object without its pixel data,
so that any node can build the SR of a series whose instances were received by
several nodes.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("node_id", sa.String(64), nullable=True))
        batch.create_index("ix_instances_node_id_status", ["node_id", "status"])
    with op.batch_alter_table("reports") as batch:
        batch.add_column(sa.Column("node_id", sa.String(64), nullable=True))
    with op.batch_alter_table("verdicts") as batch:
        batch.add_column(sa.Column("source_header", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("verdicts") as batch:
        batch.drop_column("source_header")
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("node_id")
    with op.batch_alter_table("instances") as batch:
        batch.drop_index("ix_instances_node_id_status")
        batch.drop_column("node_id")
