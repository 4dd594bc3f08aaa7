-- 0005: planograms (what the merchant wants in each slot, at which price), their sync with
-- the machines, and slot health.

ALTER TABLE machines
    ADD COLUMN config_desired  integer,         -- latest planogram version; NULL: none set
    ADD COLUMN config_reported integer,         -- what the machine last said it runs
    ADD COLUMN config_status   text,            -- the last ConfigAck's status (applied, ...)
    ADD COLUMN config_sent_at  timestamptz;     -- when Config was last published

-- Every version ever set, for the audit; the latest is machines.config_desired.
CREATE TABLE planograms (
    machine_id text NOT NULL REFERENCES machines ON DELETE CASCADE,
    version    integer NOT NULL CHECK (version >= 1),
    currency   text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    slots      jsonb NOT NULL,                  -- [{slot, product_code, name, price, ...}]
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    PRIMARY KEY (machine_id, version)
);

-- One row per slot the gateway knows of: the current planogram's product (NULL when the
-- slot is not in it) and the slot's health. A vend is checked against this row in the
-- statement that inserts it (gateway/store/vends.py).
CREATE TABLE machine_slots (
    machine_id           text NOT NULL REFERENCES machines ON DELETE CASCADE,
    slot                 smallint NOT NULL CHECK (slot BETWEEN 0 AND 255),
    product_code         text,
    name                 text,
    price                bigint,                -- minor units, in the planogram's currency
    currency             text,
    capacity             integer,
    drop_sensor          boolean,
    consecutive_failures integer NOT NULL DEFAULT 0,
    enabled              boolean NOT NULL DEFAULT true,
    disabled_at          timestamptz,
    disabled_reason      text,
    PRIMARY KEY (machine_id, slot)
);

-- Who disabled or enabled a slot, and why: the gateway automatically, or an operator.
CREATE TABLE slot_audit (
    id         bigserial PRIMARY KEY,
    machine_id text NOT NULL REFERENCES machines ON DELETE CASCADE,
    slot       smallint NOT NULL,
    action     text NOT NULL CHECK (action IN ('auto_disable', 'disable', 'enable')),
    actor      text NOT NULL,                   -- 'gateway' or 'operator:<name>'
    reason     text NOT NULL,
    detail     jsonb,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX slot_audit_by_slot ON slot_audit (machine_id, slot, id);
