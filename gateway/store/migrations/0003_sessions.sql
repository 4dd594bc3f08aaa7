-- 0003: machine presence and the history of machine sessions (docs/architecture.md, "Sessions").
--
-- Presence lives in the gateway's memory and is written here in batches (sessions.flush_interval_s),
-- so that it survives a restart and other gateways and the API can read it.

ALTER TABLE machines
    ADD COLUMN online     boolean NOT NULL DEFAULT false,
    ADD COLUMN last_seen  timestamptz,          -- the last verified uplink frame
    ADD COLUMN firmware   text,                 -- from Hello
    ADD COLUMN boot       bigint,               -- boot count of the latest frame
    ADD COLUMN session    integer,              -- the machine's own session number (Presence)
    ADD COLUMN session_id uuid,                 -- the open (or last) row of machine_sessions
    ADD COLUMN rssi       smallint;             -- dBm, from Heartbeat or a telemetry reading

CREATE TABLE machine_sessions (
    session_id      uuid PRIMARY KEY,           -- chosen by the gateway that saw it open
    machine_id      text NOT NULL REFERENCES machines ON DELETE CASCADE,
    boot            bigint NOT NULL,
    session         integer,                    -- NULL until a Presence frame names it
    connected_at    timestamptz NOT NULL,
    disconnected_at timestamptz,
    end_reason      text CHECK (end_reason IN ('clean', 'last_will', 'heartbeat_timeout',
                                               'superseded')),
    CHECK ((disconnected_at IS NULL) = (end_reason IS NULL))
);
CREATE INDEX machine_sessions_by_machine ON machine_sessions (machine_id, connected_at DESC);
CREATE INDEX machines_online ON machines (machine_id) WHERE online;
