-- 0003_stream_watermark: per sale, the highest stream entry id ("<ms>-<seq>")
-- whose order PostgreSQL has persisted, raised in the consumer's batch
-- transaction and never lowered. A Redis whose stream of the sale was last
-- generated below it has lost writes PostgreSQL counts (a restart that lost
-- its last second): the sale is rebuilt from PostgreSQL before it is used.

ALTER TABLE sales
    ADD COLUMN persisted_stream_ms  bigint NOT NULL DEFAULT 0 CHECK (persisted_stream_ms >= 0),
    ADD COLUMN persisted_stream_seq bigint NOT NULL DEFAULT 0 CHECK (persisted_stream_seq >= 0);
