-- Mark :worker SHUTDOWN (a clean stop), unless it was already found dead.
UPDATE beanflow_workers
SET state='SHUTDOWN'
WHERE beanflow_workers.id = :worker::UUID
  AND beanflow_workers.state = 'RUNNING';
