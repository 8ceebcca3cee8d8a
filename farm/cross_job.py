"""Cross-job batching (``FARM_TOP_UP``): which queued images of *other* tasks join a claim, so that
single-image jobs share GPU batches. Called by :func:`farm.lifecycle.claim` inside its transaction;
the rule for what may share a batch is :attr:`farm.request.spec.ImageSpec.batch_key`, the same one
``plan_batches`` groups a submission by and the worker's ``render_batch`` checks."""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from farm.db.tables import CampaignRecord, ImageRecord, Status
from farm.request.spec import ImageSpec

__all__ = ["TOP_UP_CAMPAIGN_SCAN", "TOP_UP_WINDOW", "top_up"]

QUEUED = Status.queued.value

#: Candidate rows read per top-up query, as a multiple of the images wanted (rows of the same columns
#: whose batch key still differs, e.g. another LoRA set, are passed over; the next claim looks again).
TOP_UP_WINDOW = 4
#: Queued rows of one campaign a top-up looks through (in index order, ~oldest first) for its key:
#: a claim's cost stays bounded however large the campaign. A campaign whose first rows hold none of
#: the key ends the search (lower-priority work never goes ahead of work it may have missed).
TOP_UP_CAMPAIGN_SCAN = 1000


def top_up(
    session: Session, mine: list[ImageRecord], chunk_size: Callable[[int, int], int], claimed: dict[str, Any]
) -> list[ImageRecord]:
    """Claim queued images of other tasks with the batch key of ``mine`` (the task's own, just
    claimed in this transaction) until the last chunk is full: ``ceil(len(mine) / chunk) × chunk``.

    Order: plain submissions first (their priority, ``SUBMISSION_PRIORITY`` = 0, is the highest, and
    at equal priority an interactive job goes before a campaign), oldest ``queued_at`` first; then
    active campaigns by ``priority``, then age (``created_at``), each campaign's images oldest first.
    So lower-priority work never goes ahead of higher-priority work of the same key, and a campaign's
    task tops up with interactive jobs first. Each query reads through an existing index
    (``ix_images_campaign_status``: ``campaign_id`` NULL for plain submissions), never the whole
    queue. On PostgreSQL the candidates are locked ``FOR UPDATE SKIP LOCKED`` (concurrent claimers
    take disjoint rows, nobody waits); SQLite has one writer; the UPDATE is guarded by
    ``status = 'queued'`` on both."""
    first = mine[0]
    spec = ImageSpec.from_params(first.params)
    size = max(1, int(chunk_size(spec.width, spec.height)))
    need = -(-len(mine) // size) * size - len(mine)
    if need <= 0:
        return []
    key = spec.batch_key
    same_columns = (
        ImageRecord.status == QUEUED,
        ImageRecord.model == spec.model,
        ImageRecord.width == spec.width,
        ImageRecord.height == spec.height,
        ImageRecord.steps == spec.steps,
        ImageRecord.scheduler == spec.scheduler,
        ImageRecord.guidance_scale == spec.guidance_scale,
    )
    oldest = (ImageRecord.queued_at, ImageRecord.submission_id, ImageRecord.position)

    def take(*where: Any, limit: int) -> list[str]:
        rows = session.execute(
            select(ImageRecord.id, ImageRecord.params)
            .where(*same_columns, *where)
            .order_by(*oldest)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        return [image_id for image_id, params in rows if _batch_key(params) == key]

    chosen = take(ImageRecord.campaign_id.is_(None), limit=need * TOP_UP_WINDOW)[:need]
    if len(chosen) < need:
        campaigns = session.scalars(
            select(CampaignRecord.id)
            .where(
                CampaignRecord.state == "active",
                # a scalar subquery with LIMIT: one index probe per campaign (EXISTS would be planned
                # as a semi-join over every queued image)
                select(ImageRecord.id)
                .where(ImageRecord.campaign_id == CampaignRecord.id, ImageRecord.status == QUEUED)
                .limit(1)
                .scalar_subquery()
                .is_not(None),
            )
            .order_by(CampaignRecord.priority, CampaignRecord.created_at, CampaignRecord.id)
        ).all()
        for campaign_id in campaigns:
            window = (
                select(ImageRecord.id)
                .where(ImageRecord.campaign_id == campaign_id, ImageRecord.status == QUEUED)
                .limit(TOP_UP_CAMPAIGN_SCAN)
            )
            scanned = session.scalar(select(func.count()).select_from(window.subquery()))
            chosen += take(ImageRecord.id.in_(window), limit=(need - len(chosen)) * TOP_UP_WINDOW)[: need - len(chosen)]
            if len(chosen) >= need or scanned >= TOP_UP_CAMPAIGN_SCAN:
                break  # full; or this campaign may hold more of the key past its window: go no lower
    if not chosen:
        return []
    session.execute(
        update(ImageRecord)
        .where(ImageRecord.id.in_(chosen), ImageRecord.status == QUEUED)
        .values(**claimed)
        .execution_options(synchronize_session=False)
    )
    order = {image_id: n for n, image_id in enumerate(chosen)}
    extra = session.scalars(
        select(ImageRecord).where(ImageRecord.id.in_(chosen), ImageRecord.claim_token == claimed["claim_token"])
    ).all()
    return sorted(extra, key=lambda image: order[image.id])


def _batch_key(params: Any) -> tuple | None:
    try:
        return ImageSpec.from_params(params).batch_key
    except (TypeError, ValueError, KeyError):  # a row this code cannot read is never mixed in
        return None
