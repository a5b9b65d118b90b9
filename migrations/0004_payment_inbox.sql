-- 0004_payment_inbox: verified gateway events that arrived before their order
-- was persisted (still `pending`, only in Redis). The webhook stores such an
-- event here and answers 200: from then on the event is ours, durably. The
-- compensator's inbox loop applies it, through the webhook's own code path,
-- once the order is in PostgreSQL (paid, or refunded when it was released),
-- or refunds it when the order can never be persisted. Exactly once: the
-- event id is unique here (a replayed delivery inserts nothing) and applying
-- inserts it into webhook_events in the same transaction as its effect.
CREATE TABLE payment_inbox (
    event_id        text        PRIMARY KEY CHECK (length(event_id) BETWEEN 1 AND 200),
    type            text        NOT NULL CHECK (type IN ('payment.succeeded', 'payment.failed')),
    payment_id      text        NOT NULL REFERENCES payments (payment_id),
    order_id        text        NOT NULL,
    amount_cents    bigint      NOT NULL CHECK (amount_cents >= 0),
    payload         jsonb       NOT NULL,
    -- when the gateway delivered it: the hold is judged live or not at this time
    received_at     timestamptz NOT NULL DEFAULT now(),
    -- the loop's bounded retries (exponential backoff while the order is pending)
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text        NULL,
    -- set once, in the transaction that applied the event (the webhook outcome)
    applied_at      timestamptz NULL,
    outcome         text        NULL CHECK (outcome IN
                        ('paid', 'refunded', 'payment_failed', 'no_change', 'duplicate',
                         'rejected')),
    CHECK ((applied_at IS NULL) = (outcome IS NULL))
);
-- what is still to apply: the loop's queue, and the expiry sweep's guard by order
CREATE INDEX payment_inbox_due ON payment_inbox (next_attempt_at) WHERE applied_at IS NULL;
CREATE INDEX payment_inbox_waiting ON payment_inbox (order_id) WHERE applied_at IS NULL;
