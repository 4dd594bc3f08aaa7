-- 0004: telemetry and dispense records, in tables partitioned by day.
--
-- Rows arrive by COPY (gateway/telemetry.py). Partitions are named <table>_pYYYYMMDD and
-- created ahead of time by gateway/store/partitions.py, which also drops whole partitions
-- older than telemetry.retention_days. Partitioned by the gateway's receive time, not the
-- machine's clock: a machine with a wrong clock must not land rows in a dropped day.
--
-- A redelivered MQTT message (QoS 1 is at least once) must not add rows twice. COPY cannot
-- skip conflicts, so each batch first records its frames in telemetry_frames (primary key
-- machine, boot, seq) and copies only the rows of the frames that were new. The ledger needs
-- to remember a frame only as long as it can be redelivered, which is bounded by the MQTT
-- session expiry (an hour); it is trimmed to a day.

CREATE TABLE telemetry_frames (
    machine_id  text NOT NULL,
    boot        bigint NOT NULL,
    seq         bigint NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (machine_id, boot, seq)
);
CREATE INDEX telemetry_frames_by_age ON telemetry_frames (received_at);

CREATE TABLE reading_kinds (
    kind smallint PRIMARY KEY,
    name text NOT NULL UNIQUE,
    unit text NOT NULL
);
INSERT INTO reading_kinds VALUES
    (1, 'temperature', 'centi-degrees Celsius'),
    (2, 'stock', 'units'),
    (3, 'rssi', 'dBm');

CREATE TABLE event_codes (
    code        text PRIMARY KEY,
    description text NOT NULL,
    eva_dts     boolean NOT NULL              -- false for vendgate's own X codes
);
INSERT INTO event_codes VALUES
    ('EJC', 'helix or motor blocked (jam)', true),
    ('EJL', 'delivery detector (drop sensor) error', true),
    ('EGS', 'door open (active) or closed (cleared)', true),
    ('XSD', 'slot taken out of service after repeated failed dispenses', false);

CREATE TABLE telemetry_readings (
    received_at timestamptz NOT NULL,         -- gateway clock; the partition key
    machine_id  text NOT NULL,
    boot        bigint NOT NULL,
    seq         bigint NOT NULL,
    idx         smallint NOT NULL,            -- row i of the frame (SPEC §5.2, Telemetry)
    at          timestamptz NOT NULL,         -- machine clock: t0_ms + dt_ms
    kind        smallint NOT NULL,            -- reading_kinds
    slot        smallint,
    value       integer NOT NULL
) PARTITION BY RANGE (received_at);
CREATE INDEX telemetry_readings_by_machine ON telemetry_readings (machine_id, at);

CREATE TABLE telemetry_events (
    received_at timestamptz NOT NULL,
    machine_id  text NOT NULL,
    boot        bigint NOT NULL,
    seq         bigint NOT NULL,
    idx         smallint NOT NULL,            -- continues after the frame's readings
    at          timestamptz NOT NULL,
    code        text NOT NULL,                -- EVA-DTS code where one exists (event_codes)
    slot        smallint,
    active      boolean NOT NULL
) PARTITION BY RANGE (received_at);
CREATE INDEX telemetry_events_by_machine ON telemetry_events (machine_id, at);

-- One row per vend result committed, in the same transaction as the vend's state change
-- (so exactly one per settled vend), plus any later result that contradicts or completes it.
CREATE TABLE dispenses (
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    vend_id       text NOT NULL,
    machine_id    text NOT NULL,
    slot          smallint NOT NULL,
    outcome       text NOT NULL CHECK (outcome IN ('dispensed', 'failed', 'uncertain')),
    reason        text NOT NULL,
    drop_detected boolean NOT NULL,
    motor_ms      integer NOT NULL,
    retries       smallint NOT NULL,
    late          boolean NOT NULL DEFAULT false -- received after the vend was settled
) PARTITION BY RANGE (recorded_at);
CREATE INDEX dispenses_by_vend ON dispenses (vend_id);
CREATE INDEX dispenses_by_machine_slot ON dispenses (machine_id, slot, recorded_at);
