-- 0001: machines, vends, their transition history, and the webhook outbox.
-- Applied once, in a transaction, by `vendgate migrate` or at start-up.

CREATE TABLE machines (
    machine_id  text PRIMARY KEY CHECK (machine_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vends (
    vend_id       text PRIMARY KEY CHECK (length(vend_id) BETWEEN 1 AND 64),  -- payment order number
    wire_id       bigint NOT NULL UNIQUE CHECK (wire_id >= 0),                 -- id on the wire (SPEC §5.1)
    machine_id    text NOT NULL REFERENCES machines,
    slot          smallint NOT NULL CHECK (slot BETWEEN 0 AND 255),
    price         bigint NOT NULL CHECK (price BETWEEN 0 AND 4294967295),      -- minor units
    currency      text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    deadline      timestamptz NOT NULL,
    request_hash  bytea NOT NULL,          -- of the canonical request: a repeat must match it
    state         text NOT NULL CHECK (state IN ('accepted', 'sent', 'acknowledged', 'dispensed',
                                                 'failed', 'rejected', 'expired', 'unknown')),
    queue_seq     bigserial,               -- FIFO order of a machine's vends
    attempts      integer NOT NULL DEFAULT 0,
    dispense      jsonb,                   -- the machine's Dispense record, once known
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    first_sent_at timestamptz,
    settled_at    timestamptz              -- when it became final (or unknown)
);

-- Recovery and per-machine queues read only the vends that are not final.
CREATE INDEX vends_active_by_machine ON vends (machine_id, queue_seq)
    WHERE state IN ('accepted', 'sent', 'acknowledged', 'unknown');

CREATE TABLE vend_transitions (
    id          bigserial PRIMARY KEY,
    vend_id     text NOT NULL REFERENCES vends ON DELETE CASCADE,
    from_state  text,                      -- NULL for the creation
    to_state    text NOT NULL,
    event       text NOT NULL,
    actor       text NOT NULL DEFAULT 'gateway',   -- 'operator:<name>' for a manual resolution
    detail      jsonb,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vend_transitions_by_vend ON vend_transitions (vend_id, id);

CREATE TABLE webhook_outbox (
    id              bigserial PRIMARY KEY,   -- delivery order
    event_id        uuid NOT NULL UNIQUE,    -- receivers de-duplicate on it
    vend_id         text NOT NULL REFERENCES vends ON DELETE CASCADE,
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz
);
CREATE INDEX webhook_outbox_pending ON webhook_outbox (next_attempt_at, id)
    WHERE delivered_at IS NULL;
CREATE INDEX webhook_outbox_by_vend ON webhook_outbox (vend_id, id) WHERE delivered_at IS NULL;
