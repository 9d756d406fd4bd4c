-- End the attempt of :task_id held by :worker other than by completing it: :state
-- FAILED or CANCELLED, or PENDING again at :retry_at (a retry, or a snooze that gives
-- its attempt back with :refund 1), with an :event row carrying the error; returns its
-- id, or nothing when the worker no longer holds it.
WITH settled AS
  (UPDATE beanflow_tasks
   SET state=:state,
       error_message=:error,
       attempts=(beanflow_tasks.attempts - :refund),
       scheduled_at=coalesce(:retry_at, beanflow_tasks.scheduled_at),
       finished_at=clock_timestamp(),
       worker_id=CASE
                     WHEN (:state = 'PENDING') THEN NULL
                     ELSE beanflow_tasks.worker_id
                 END
   WHERE beanflow_tasks.id = :task_id::UUID
     AND beanflow_tasks.worker_id = :worker::UUID RETURNING beanflow_tasks.id)
SELECT settled.id,

  (SELECT count(pg_notify('beanflow_done', CAST(beanflow_waiters.task_id AS TEXT))) AS count_1
   FROM beanflow_waiters
   WHERE beanflow_waiters.task_id = :task_id::UUID) AS anon_1
FROM settled;
