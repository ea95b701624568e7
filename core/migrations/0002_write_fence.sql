-- The write fence: which path decides a record's writes, Redis or the DB.
-- A write is decided only against the newest acknowledged state of its
-- record. While Redis serves, that state is in Redis; the DB may lag the
-- stream by up to a job window. The DB path opens only once the DB is
-- proven to hold every acknowledged write that could matter (see
-- core/src/fence.rs and docs/architecture.md, "Write path").

-- One row. mode: 0 Redis decides, 1 the DB path decides, 2 closing the DB
-- path (dropping what it changed from the cache before Redis decides
-- again). epoch grows each time the DB path is asked for. floor_ms: the
-- schema's creation; no stream entry of this tenant is older.
CREATE TABLE write_fence (
    id       TINYINT NOT NULL,
    mode     TINYINT NOT NULL,
    epoch    BIGINT  NOT NULL,
    floor_ms BIGINT  NOT NULL,
    PRIMARY KEY (id)
);
INSERT INTO write_fence (id, mode, epoch, floor_ms)
VALUES (1, 0, 0, CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED));

-- Per stream shard: every entry whose id is below applied_ms (Redis clock,
-- Unix ms) is applied to this DB. Written by the job; only grows.
CREATE TABLE stream_watermarks (
    shard      INT    NOT NULL,
    applied_ms BIGINT NOT NULL,
    PRIMARY KEY (shard)
);

-- Service processes that may acknowledge writes through Redis. A writer
-- acknowledges only while now < lease_until_ms, so once the shard
-- watermarks pass lease_until_ms, everything it acknowledged is applied.
-- published_epoch: the fence epoch for which it stopped writing through
-- Redis and put everything it acknowledged that may not be applied yet
-- into this DB.
CREATE TABLE fence_writers (
    instance        VARCHAR(128) NOT NULL,
    lease_until_ms  BIGINT       NOT NULL,
    published_epoch BIGINT       NOT NULL,
    PRIMARY KEY (instance)
);

-- Records whose newest write through Redis has an unknown outcome (the
-- call timed out or its connection broke): the DB cannot know their state,
-- so the DB path refuses them for that epoch.
CREATE TABLE unsettled_records (
    epoch       BIGINT NOT NULL,
    mid         BIGINT NOT NULL,
    business_id BIGINT NOT NULL,
    message_id  BIGINT NOT NULL,
    PRIMARY KEY (epoch, mid, business_id, message_id)
);
