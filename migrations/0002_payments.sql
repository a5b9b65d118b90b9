-- 0002_payments: payments, gateway webhook events, refunds, shipments and the
-- fulfilment saga (paid -> shipped, or refunded and released).
-- Every state change of these tables is a guarded UPDATE or an INSERT ... ON
-- CONFLICT DO NOTHING, so retries and replays are harmless.

-- One payment per order. The order may still be `pending` (only in Redis) when
-- the buyer asks to pay, so there is no foreign key to orders: the payment
-- keeps the order's sale, buyer and amount itself.
CREATE TABLE payments (
    payment_id    text        PRIMARY KEY CHECK (length(payment_id) BETWEEN 1 AND 80),
    order_id      text        NOT NULL UNIQUE,
    sale_id       text        NOT NULL REFERENCES sales (sale_id),
    user_id       text        NOT NULL CHECK (length(user_id) BETWEEN 1 AND 64),
    amount_cents  bigint      NOT NULL CHECK (amount_cents >= 0),
    status        text        NOT NULL DEFAULT 'requires_payment' CHECK (status IN
                      ('requires_payment', 'succeeded', 'failed', 'refunded')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- set when the gateway reported the money taken; a refund needs it
    succeeded_at  timestamptz NULL,
    CHECK ((status IN ('succeeded', 'refunded')) = (succeeded_at IS NOT NULL))
);

-- Every gateway event processed, at most once: the insert of its id is in the
-- same transaction as the state change it causes.
CREATE TABLE webhook_events (
    event_id     text        PRIMARY KEY CHECK (length(event_id) BETWEEN 1 AND 200),
    type         text        NOT NULL CHECK (type IN ('payment.succeeded', 'payment.failed')),
    payment_id   text        NOT NULL,
    order_id     text        NOT NULL,
    -- what processing did: paid, refunded, payment_failed, no_change
    outcome      text        NOT NULL DEFAULT 'received' CHECK (outcome IN
                     ('received', 'paid', 'refunded', 'payment_failed', 'no_change')),
    payload      jsonb       NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

-- Money to give back, at most once per payment. A row is the decision; the
-- saga runner executes it at the gateway (an outbox, with bounded retries).
CREATE TABLE refunds (
    refund_id         text        PRIMARY KEY,
    payment_id        text        NOT NULL UNIQUE REFERENCES payments (payment_id),
    order_id          text        NOT NULL,
    amount_cents      bigint      NOT NULL CHECK (amount_cents >= 0),
    reason            text        NOT NULL CHECK (reason IN ('order_expired', 'order_cancelled',
                          'order_failed', 'order_missing', 'shipment_failed')),
    status            text        NOT NULL DEFAULT 'requested'
                          CHECK (status IN ('requested', 'succeeded', 'failed')),
    attempts          integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    last_error        text        NULL,
    gateway_refund_id text        NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz NULL,
    CHECK ((status = 'requested') = (completed_at IS NULL)),
    CHECK ((status = 'succeeded') = (gateway_refund_id IS NOT NULL))
);
CREATE INDEX refunds_due ON refunds (next_attempt_at) WHERE status = 'requested';

-- The outcome of booking an order's shipment: booked, or failed for good.
CREATE TABLE shipments (
    order_id        text        PRIMARY KEY REFERENCES orders (order_id),
    shipment_id     text        NULL UNIQUE,
    tracking_number text        NULL,
    status          text        NOT NULL CHECK (status IN ('booked', 'failed')),
    attempts        integer     NOT NULL CHECK (attempts >= 1),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'booked') = (shipment_id IS NOT NULL AND tracking_number IS NOT NULL))
);

-- The fulfilment saga of a paid order, created in the transaction that made it
-- paid: `ship` until the carrier booked it (`done`) or booking finally failed
-- and the order was refunded and released (`compensated`). next_attempt_at is
-- the backoff and the lease of the runner working on it, so a crash resumes.
CREATE TABLE order_sagas (
    order_id        text        PRIMARY KEY REFERENCES orders (order_id),
    step            text        NOT NULL DEFAULT 'ship'
                        CHECK (step IN ('ship', 'done', 'compensated')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text        NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_sagas_due ON order_sagas (next_attempt_at) WHERE step = 'ship';

-- A paid order names its payment; a shipped order names its shipment.
ALTER TABLE orders ADD CONSTRAINT orders_paid_has_payment
    CHECK (status NOT IN ('paid', 'shipped') OR payment_id IS NOT NULL);
ALTER TABLE orders ADD CONSTRAINT orders_shipped_has_shipment
    CHECK (status <> 'shipped' OR (shipment_id IS NOT NULL AND tracking_number IS NOT NULL));
