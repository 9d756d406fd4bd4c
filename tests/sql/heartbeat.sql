-- Record that :worker is alive; returns its state (not RUNNING once it was reaped).
UPDATE beanflow_workers
SET last_heartbeat=now()
WHERE beanflow_workers.id = :worker::UUID RETURNING beanflow_workers.state;
