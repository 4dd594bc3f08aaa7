-- 0002: a lease on claimed webhook events, so that several gateways can share the outbox.
--
-- A gateway claims an event by setting leased_until (SELECT ... FOR UPDATE SKIP LOCKED, one
-- statement) and keeps no transaction open while it POSTs. Others skip a leased event until
-- the lease runs out, which is longer than the POST timeout; a gateway that dies mid-delivery
-- lets its lease lapse and the event is delivered again (at least once; receivers de-duplicate
-- on event_id). `attempts` is counted at the claim, so it also fences a late outcome.

ALTER TABLE webhook_outbox ADD COLUMN leased_until timestamptz;
