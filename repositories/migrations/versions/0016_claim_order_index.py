"""Claims in O(batch) (issue #28): indexes in claim order (``prorch.model.due.CLAIM_ORDER``:
priority descending, then next_run_at), one over every name and one per name, so that a claim,
plain or limited, walks the due pipelines it takes instead of reading and sorting all of them.

Revision ID: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None
additive = True  # indexes only

PRIORITY_DESCENDING = sa.text("priority DESC")


def upgrade() -> None:
    op.create_index("ix_pipelines_claim", "pipelines", ["status", PRIORITY_DESCENDING, "next_run_at"])
    op.create_index("ix_pipelines_claim_name", "pipelines", ["status", "name", PRIORITY_DESCENDING, "next_run_at"])


def downgrade() -> None:
    op.drop_index("ix_pipelines_claim_name", table_name="pipelines")
    op.drop_index("ix_pipelines_claim", table_name="pipelines")
