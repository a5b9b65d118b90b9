-- 0001_core: sales, orders, restocks, releases.
-- PostgreSQL is the system of record; Redis is the fast path in front of it.
-- Invariants are enforced here too, not only in Lua.

CREATE TABLE sales (
    sale_id         text        PRIMARY KEY,
    sku             text        NOT NULL CHECK (length(sku) BETWEEN 1 AND 64),
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    price_cents     bigint      NOT NULL CHECK (price_cents >= 0),
    stock           bigint      NOT NULL CHECK (stock >= 0),
    -- the final deduction: quantity of orders awaiting_payment, paid or shipped
    sold            bigint      NOT NULL DEFAULT 0 CHECK (sold >= 0 AND sold <= stock),
    per_user_limit  integer     NOT NULL CHECK (per_user_limit >= 1),
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NULL CHECK (ends_at IS NULL OR ends_at > starts_at),
    hold_seconds    integer     NOT NULL CHECK (hold_seconds >= 1),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    order_id        text        PRIMARY KEY,
    sale_id         text        NOT NULL REFERENCES sales (sale_id),
    user_id         text        NOT NULL CHECK (length(user_id) BETWEEN 1 AND 64),
    quantity        integer     NOT NULL CHECK (quantity >= 1),
    amount_cents    bigint      NOT NULL CHECK (amount_cents >= 0),
    status          text        NOT NULL CHECK (status IN
                        ('awaiting_payment', 'paid', 'shipped', 'cancelled', 'expired', 'failed')),
    idempotency_key text        NULL,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    payment_id      text        NULL UNIQUE,
    shipment_id     text        NULL UNIQUE,
    tracking_number text        NULL
);
-- one order per (sale, buyer, idempotency key); a failed duplicate may stand beside it
CREATE UNIQUE INDEX orders_idempotency_uq ON orders (sale_id, user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status <> 'failed';
CREATE INDEX orders_sale_status ON orders (sale_id, status);
CREATE INDEX orders_hold_expiry ON orders (expires_at) WHERE status = 'awaiting_payment';

-- every restock, applied to Redis exactly once (the id guards it there)
CREATE TABLE restocks (
    restock_id      bigserial   PRIMARY KEY,
    sale_id         text        NOT NULL REFERENCES sales (sale_id),
    quantity        bigint      NOT NULL CHECK (quantity >= 1),
    created_at      timestamptz NOT NULL DEFAULT now(),
    applied_at      timestamptz NULL
);
CREATE INDEX restocks_unapplied ON restocks (restock_id) WHERE applied_at IS NULL;

-- every release of held stock: who, why, when; one per order at most.
-- redis_released_at is the outbox flag: set once Redis has the stock back.
CREATE TABLE releases (
    order_id          text        PRIMARY KEY REFERENCES orders (order_id),
    sale_id           text        NOT NULL REFERENCES sales (sale_id),
    quantity          integer     NOT NULL CHECK (quantity >= 1),
    reason            text        NOT NULL CHECK (reason IN ('cancelled', 'expired', 'failed')),
    actor             text        NOT NULL,
    detail            text        NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    redis_released_at timestamptz NULL
);
CREATE INDEX releases_outbox ON releases (created_at) WHERE redis_released_at IS NULL;
