-- Retention: old audit events are pruned by time, oldest first.
CREATE INDEX audit_by_at ON audit_events (at);
