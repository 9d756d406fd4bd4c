-- Record a failed attempt of :task_id held by :worker: FAILED, or back to PENDING at
-- :retry_at when :retry_at is not null; returns its id, or nothing when not held.
WITH failed AS
  (UPDATE beanflow_tasks
   SET state=CASE
                 WHEN (:retry_at IS NOT NULL) THEN 'PENDING'
                 ELSE 'FAILED'
             END,
             error_message=:error,
             scheduled_at=coalesce(:retry_at, beanflow_tasks.scheduled_at),
             finished_at=clock_timestamp(),
             worker_id=CASE
                           WHEN (:retry_at IS NOT NULL) THEN NULL
                           ELSE beanflow_tasks.worker_id
                       END
   WHERE beanflow_tasks.id = :task_id::UUID
     AND beanflow_tasks.worker_id = :worker::UUID RETURNING beanflow_tasks.id,
                                                            beanflow_tasks.state)
SELECT failed.id
FROM failed;
