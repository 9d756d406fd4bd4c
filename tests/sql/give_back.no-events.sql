-- Return the tasks :task_ids that :worker claimed and has not started to PENDING,
-- their attempt given back, and notify their channels: a batch that ran past its window
-- lets other workers have the rest of it. By primary key, as ``complete``.
WITH returned AS
  (UPDATE beanflow_tasks
   SET state='PENDING',
       attempts=(beanflow_tasks.attempts - :attempts_1),
       started_at=:param_1,
       worker_id=:param_2::UUID
   WHERE beanflow_tasks.id = ANY (:task_ids::UUID[])
     AND beanflow_tasks.worker_id = :worker::UUID RETURNING beanflow_tasks.id,
                                                            beanflow_tasks.channel)
SELECT pg_notify(anon_1.channel, :pg_notify_2) AS pg_notify_1
FROM
  (SELECT DISTINCT returned.channel AS channel
   FROM returned) AS anon_1;
