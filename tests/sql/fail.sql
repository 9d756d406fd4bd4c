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
                                                            beanflow_tasks.state),
     failed_events AS
  (INSERT INTO beanflow_events (task_id, TYPE, error_message, exception_type, traceback, scheduled_at) SELECT failed.id AS task_id,
                                                                                                              CASE
                                                                                                                  WHEN (failed.state = 'PENDING') THEN 'FAILED_RETRY_SCHEDULED'
                                                                                                                  ELSE 'FAILED'
                                                                                                              END AS TYPE,
                                                                                                              :error AS error_message,
                                                                                                              :exception_type AS exception_type,
                                                                                                              :traceback AS traceback,
                                                                                                              :retry_at AS scheduled_at
   FROM failed)
SELECT failed.id
FROM failed;
