-- 0005_live_sales: the index of live sales, the only list of sales any loop
-- iterates (flashsale/core/live_sales.py owns it).
--
-- A sale is live from its creation until it is drained: ended at least
-- FLASHSALE_LIVE_ENDED_GRACE_S ago, no entry left in its stream and none
-- pending in Redis, no hold whose fate is open (awaiting_payment), no release
-- still to apply in Redis (releases outbox) and no restock still to apply.
-- live_sales.drain() sets drained_at once all of that holds; work that
-- appears for a drained sale afterwards (a release row: a paid order refunded
-- late; a restock row) makes it live again in the same statement, by the
-- triggers below. (No order is persisted for a drained sale: orders come
-- from stream entries, and a sale with one is not drained.)
-- Loops select WHERE drained_at IS NULL: the partial index keeps what they
-- read proportional to what is live, whatever the history.

ALTER TABLE sales
    ADD COLUMN drained_at timestamptz NULL,
    ADD CONSTRAINT sales_drained_after_end CHECK (drained_at IS NULL OR ends_at IS NOT NULL);

CREATE INDEX sales_live ON sales (created_at DESC, sale_id) WHERE drained_at IS NULL;

-- one primary-key update per sale the statement touched (never a scan of sales)
CREATE FUNCTION sales_undrain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sid text;
BEGIN
    FOR sid IN SELECT DISTINCT sale_id FROM new_rows LOOP
        UPDATE sales SET drained_at = NULL WHERE sale_id = sid AND drained_at IS NOT NULL;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER releases_undrain_sale AFTER INSERT ON releases
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sales_undrain();
CREATE TRIGGER restocks_undrain_sale AFTER INSERT ON restocks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sales_undrain();
