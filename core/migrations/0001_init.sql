-- thumbup tenant schema. Plain SQL that MySQL 8, TiDB and MariaDB share.

-- One row per (user, item) ever touched. `version` is the newest applied
-- version: the job applies an event only when it is newer.
CREATE TABLE like_records (
    mid         BIGINT   NOT NULL,
    business_id BIGINT   NOT NULL,
    message_id  BIGINT   NOT NULL,
    up_mid      BIGINT   NOT NULL,
    state       TINYINT  NOT NULL,
    version     BIGINT   NOT NULL,
    mtime       BIGINT   NOT NULL,
    PRIMARY KEY (mid, business_id, message_id),
    KEY idx_user_list (mid, business_id, state, mtime, message_id),
    KEY idx_item_likers (business_id, message_id, state, mtime, mid)
);

-- Aggregated counts, changed only by summed deltas (one statement per batch
-- per item), never by a per-like UPDATE. `version` grows with every change.
CREATE TABLE like_counts (
    business_id BIGINT NOT NULL,
    message_id  BIGINT NOT NULL,
    likes       BIGINT NOT NULL,
    dislikes    BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    PRIMARY KEY (business_id, message_id)
);

-- Likes received by an item owner, per business.
CREATE TABLE received_likes (
    business_id BIGINT NOT NULL,
    up_mid      BIGINT NOT NULL,
    likes       BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    PRIMARY KEY (business_id, up_mid)
);

-- Records changed by the synchronous DB path while Redis was unreachable:
-- their cache entries are dropped before Redis serves again.
CREATE TABLE cache_invalidations (
    id          BIGINT NOT NULL AUTO_INCREMENT,
    mid         BIGINT NOT NULL,
    business_id BIGINT NOT NULL,
    message_id  BIGINT NOT NULL,
    up_mid      BIGINT NOT NULL,
    PRIMARY KEY (id)
);
