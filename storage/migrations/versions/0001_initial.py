"""Initial schema: instances, verdicts, reports, report_instances, events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Kept literal on purpose: a migration must not change when storage.models does.
UNREPORTED_PREDICATE = "status = 'analysed' AND reported_at IS NULL"


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("peer_address", sa.String(255), nullable=False),
        _ts("received_at", nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        _ts("claimed_at"),
        sa.Column("spool_path", sa.String(512), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        _ts("spool_deleted_at"),
        _ts("reported_at"),
        sa.CheckConstraint(
            "status IN ('received', 'analysing', 'analysed', 'skipped', 'failed')", name="ck_instances_status"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", "sha256", name="uq_instances_sop_instance_uid_sha256"),
    )
    op.create_index("ix_instances_status_received_at", "instances", ["status", "received_at"])
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"])
    op.create_index("ix_instances_study_instance_uid", "instances", ["study_instance_uid"])
    op.create_index(
        "ix_instances_unreported",
        "instances",
        ["study_instance_uid", "series_instance_uid"],
        sqlite_where=sa.text(UNREPORTED_PREDICATE),
        postgresql_where=sa.text(UNREPORTED_PREDICATE),
    )

    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("classifier_score", sa.Float(), nullable=False),
        sa.Column("retrieval_score", sa.Float(), nullable=True),
        sa.Column("frames_scored", sa.Integer(), nullable=False),
        sa.Column("bundle_name", sa.String(128), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(255), nullable=False),
        sa.Column("elapsed_ms", sa.Float(), nullable=False),
        _ts("created_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_verdicts_instance_id_instances", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_verdicts"),
        sa.UniqueConstraint("instance_id", name="uq_verdicts_instance_id"),
    )
    op.create_index("ix_verdicts_created_at", "verdicts", ["created_at"])

    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("source_series_instance_uid", sa.String(64), nullable=True),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        _ts("next_attempt_at"),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("sent_at"),
        _ts("claimed_at"),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("suspected_count", sa.Integer(), nullable=False),
        sa.Column("max_score", sa.Float(), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'sending', 'sent', 'retrying', 'dead')", name="ck_reports_status"),
        sa.PrimaryKeyConstraint("id", name="pk_reports"),
        sa.UniqueConstraint("sop_instance_uid", "destination", name="uq_reports_sop_instance_uid_destination"),
    )
    op.create_index("ix_reports_status_next_attempt_at", "reports", ["status", "next_attempt_at"])
    op.create_index(
        "ix_reports_study_instance_uid_source_series_instance_uid",
        "reports",
        ["study_instance_uid", "source_series_instance_uid"],
    )

    op.create_table(
        "report_instances",
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"], ["reports.id"], name="fk_report_instances_report_id_reports", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name="fk_report_instances_instance_id_instances", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("report_id", "instance_id", name="pk_report_instances"),
    )
    op.create_index("ix_report_instances_instance_id", "report_instances", ["instance_id"])

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        _ts("at", nullable=False),
        sa.Column("entity", sa.String(16), nullable=False),
        sa.Column("entity_id", sa.Integer(), nullable=True),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.CheckConstraint("entity IN ('instance', 'report', 'node')", name="ck_events_entity"),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_entity_entity_id", "events", ["entity", "entity_id"])
    op.create_index("ix_events_at", "events", ["at"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("report_instances")
    op.drop_table("reports")
    op.drop_table("verdicts")
    op.drop_table("instances")
